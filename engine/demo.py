"""``python -m engine.demo`` (the README's command, = ``zwallet demo``): engine/devtools/demo.py."""
from engine.devtools.demo import main

if __name__ == "__main__":
    raise SystemExit(main())

"""zwallet's read side (CQRS): projectors, views, the query service and the exactly-once PostgreSQL export."""

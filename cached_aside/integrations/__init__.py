"""Integrations with web frameworks and databases, each an optional extra.

`cached_aside.integrations.sqlalchemy` and `cached_aside.integrations.django` run
invalidations after the database transaction commits (and drop them on rollback);
`cached_aside.integrations.fastapi` opens and closes the engine with the app. Nothing is
imported here: each module needs only its own framework, installed with its extra.
"""

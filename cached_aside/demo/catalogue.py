"""The demo's primary store: products in a real SQLite file, read slowly on purpose.

Each read sleeps the configured latency, as a remote database would, and is counted
so the page can show how many reads reached the primary.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

SEED = [
    ("p-001", "Fountain pen", "24.50", 41, "blue"),
    ("p-002", "Notebook A5", "6.90", 120, "black"),
    ("p-003", "Desk lamp", "39.00", 7, "white"),
    ("p-004", "Ink bottle", "8.20", 64, "blue"),
    ("p-005", "Paper clips", "1.50", 500, "silver"),
]
FIELDS = ("name", "price", "stock", "colour")


@dataclass(frozen=True)
class Product:
    """One row of the catalogue, as the repository returns it (and the cache too: the
    return annotation of the cached reader is the schema of its entries)."""

    id: str
    name: str
    price: Decimal
    stock: int
    colour: str


class CatalogueError(ValueError):
    """A change the catalogue refuses; the message says what is acceptable."""


class Catalogue:
    """Products in SQLite; every read costs `latency_ms` and is counted."""

    def __init__(self, path: Path, latency_ms: float) -> None:
        self.path = path
        self.latency_ms = latency_ms
        self._lock = threading.Lock()
        self.reads = 0
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS products (id TEXT PRIMARY KEY, name TEXT NOT NULL,"
                " price TEXT NOT NULL, stock INTEGER NOT NULL, colour TEXT NOT NULL)"
            )
            db.executemany("INSERT OR REPLACE INTO products VALUES (?, ?, ?, ?, ?)", SEED)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def ids(self) -> list[str]:
        with self._connect() as db:
            return [row[0] for row in db.execute("SELECT id FROM products ORDER BY id")]

    def read(self, id: str) -> Product | None:
        """One slow primary read."""
        with self._lock:
            self.reads += 1
        time.sleep(self.latency_ms / 1000)
        with self._connect() as db:
            row = db.execute(
                "SELECT id, name, price, stock, colour FROM products WHERE id = ?", (id,)
            ).fetchone()
        if row is None:
            return None
        id, name, price, stock, colour = row
        return Product(id, name, Decimal(price), stock, colour)

    def exists(self, id: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM products WHERE id = ?", (id,)).fetchone() is not None

    def update(self, id: str, field: str, value: object) -> str | int:
        """Write one field; returns the stored value. Raises CatalogueError on bad input."""
        stored = checked_value(field, value)
        # checked_value refused any field outside FIELDS, so the column name is ours.
        with self._connect() as db:
            db.execute(f"UPDATE products SET {field} = ? WHERE id = ?", (stored, id))
        return stored


def checked_value(field: str, value: object) -> str | int:
    """Validate a field's new value the way the primary's schema would."""
    if field not in FIELDS:
        raise CatalogueError(f"unknown field {field!r}; use one of {', '.join(FIELDS)}")
    text = str(value).strip() if isinstance(value, str | int | float) else None
    if not text or len(text) > 100:
        raise CatalogueError(f"{field} needs a value of 1 to 100 characters")
    if field == "stock":
        if not text.isdigit():
            raise CatalogueError("stock must be a whole number >= 0")
        return int(text)
    if field == "price":
        try:
            price = Decimal(text)
        except InvalidOperation:
            raise CatalogueError("price must be a number such as 12.50") from None
        if not price.is_finite() or price < 0:
            raise CatalogueError("price must be a number >= 0")
        return f"{price:.2f}"
    return text

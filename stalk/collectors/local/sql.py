"""The schema and statements of the local backend's SQLite file, in one place.

A message row is leased by moving ``visible_at`` to the end of the lease and bumping
``lease_token``. The token is the fence: an ack, retry or extend carrying an older token changes
nothing, so a worker whose lease lapsed and was taken by another cannot delete or move the row.
``stalk_queues.length`` counts every row of a queue so that a publish checks
``max_queue_length`` in O(1); each statement that adds, deletes or moves rows updates it in the
same transaction.
"""

from __future__ import annotations

#: ``PRAGMA application_id`` of a stalk file ("STLK"): tells ours from another program's database.
APPLICATION_ID = 0x53544C4B
#: ``PRAGMA user_version`` of the schema below; bump with a migration when it changes.
SCHEMA_VERSION = 1

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS stalk_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- the seqno; never reused, so fences hold
    queue       TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    attributes  TEXT,                               -- JSON object, NULL when empty
    attempts    INTEGER NOT NULL DEFAULT 0,         -- leases taken (deliveries)
    enqueued_at REAL    NOT NULL,
    visible_at  REAL    NOT NULL,                   -- due time, or end of the current lease
    expires_at  REAL,                               -- message_ttl_s; NULL = never
    leased      INTEGER NOT NULL DEFAULT 0,
    lease_token INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS stalk_messages_due ON stalk_messages (queue, visible_at)",
    """CREATE TABLE IF NOT EXISTS stalk_queues (
    name   TEXT PRIMARY KEY,
    length INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS stalk_subscriptions (
    topic      TEXT NOT NULL,
    queue      TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (topic, queue)) WITHOUT ROWID""",
)

#: One statement, so one implicit transaction: lease the due rows, oldest due first.
LEASE = """
UPDATE stalk_messages
SET visible_at = ?, attempts = attempts + 1, leased = 1, lease_token = lease_token + 1
WHERE id IN (SELECT id FROM stalk_messages WHERE queue = ? AND visible_at <= ?
             ORDER BY visible_at, id LIMIT ?)
RETURNING id, body, attributes, attempts, enqueued_at, expires_at, lease_token
"""
INSERT = """
INSERT INTO stalk_messages (queue, body, attributes, enqueued_at, visible_at, expires_at)
VALUES (?, ?, ?, ?, ?, ?) RETURNING id
"""
DELETE = "DELETE FROM stalk_messages WHERE id = ? AND lease_token = ?"
REQUEUE = """
UPDATE stalk_messages SET visible_at = ?, leased = 0, lease_token = lease_token + 1,
    attempts = attempts - ?, attributes = ?
WHERE id = ? AND lease_token = ?
"""
EXTEND = "UPDATE stalk_messages SET visible_at = ? WHERE id = ? AND lease_token = ? AND leased = 1"
MOVE = """
UPDATE stalk_messages SET queue = ?, attributes = ?, attempts = 0, enqueued_at = ?,
    visible_at = ?, expires_at = NULL, leased = 0, lease_token = lease_token + 1
WHERE id = ? AND lease_token = ?
"""
LENGTH = "SELECT length FROM stalk_queues WHERE name = ?"
#: When the next row of a queue falls due (a delay ends or a lease lapses); O(log n) on the index.
NEXT_DUE = "SELECT MIN(visible_at) FROM stalk_messages WHERE queue = ?"
COUNT = """
INSERT INTO stalk_queues (name, length) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET length = length + excluded.length
"""
BACKLOG = """
SELECT COALESCE(SUM(visible_at <= :now), 0),
       COALESCE(SUM(visible_at > :now AND leased = 0), 0),
       COALESCE(SUM(visible_at > :now AND leased = 1), 0),
       MIN(CASE WHEN visible_at <= :now THEN enqueued_at END)
FROM stalk_messages WHERE queue = :queue
"""
SUBSCRIBE = "INSERT OR IGNORE INTO stalk_subscriptions VALUES (?, ?, ?)"
UNSUBSCRIBE = "DELETE FROM stalk_subscriptions WHERE topic = ? AND queue = ?"
SUBSCRIPTIONS = """
SELECT queue FROM stalk_subscriptions WHERE topic = ? ORDER BY created_at, queue
"""

-- Many sidecars, one database: each sidecar records a heartbeat row here. (SQLite has no
-- LISTEN/NOTIFY; there the refresh interval bounds how fast a change reaches a sidecar.)

CREATE TABLE sidecars (
    id           TEXT    PRIMARY KEY,
    host         TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    seen_at      INTEGER NOT NULL,
    watermark    INTEGER NOT NULL,
    table_age_ms INTEGER,
    keys         INTEGER NOT NULL
);
CREATE INDEX sidecars_seen_at ON sidecars (seen_at);

-- Admin console: server-side sessions (only a digest of the cookie token is stored), and the
-- rotation link between an old key and its replacement with the old key's auto-retire rule.

CREATE TABLE sessions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    token_digest TEXT    NOT NULL UNIQUE,
    user_id      INTEGER NOT NULL REFERENCES users (id),
    csrf_token   TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    client_addr  TEXT,
    ended_at     INTEGER
);
CREATE INDEX sessions_user_id ON sessions (user_id);

-- The key that replaced this one (set by "Create replacement").
ALTER TABLE api_keys ADD COLUMN replaced_by INTEGER REFERENCES api_keys (id);
-- Revoke this key by itself once its replacement has carried traffic and this key has been
-- idle this long (milliseconds); NULL: no auto-retire.
ALTER TABLE api_keys ADD COLUMN retire_after_idle_ms INTEGER;

CREATE INDEX audit_log_actor_action ON audit_log (actor_type, action);

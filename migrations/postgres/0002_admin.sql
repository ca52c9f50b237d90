-- Admin console: server-side sessions (only a digest of the cookie token is stored), and the
-- rotation link between an old key and its replacement with the old key's auto-retire rule.

CREATE TABLE sessions (
    id           BIGSERIAL PRIMARY KEY,
    token_digest TEXT   NOT NULL UNIQUE,
    user_id      BIGINT NOT NULL REFERENCES users (id),
    csrf_token   TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    client_addr  TEXT,
    ended_at     BIGINT
);
CREATE INDEX sessions_user_id ON sessions (user_id);

-- The key that replaced this one (set by "Create replacement").
ALTER TABLE api_keys ADD COLUMN replaced_by BIGINT REFERENCES api_keys (id);
-- Revoke this key by itself once its replacement has carried traffic and this key has been
-- idle this long (milliseconds); NULL: no auto-retire.
ALTER TABLE api_keys ADD COLUMN retire_after_idle_ms BIGINT;

CREATE INDEX audit_log_actor_action ON audit_log (actor_type, action);

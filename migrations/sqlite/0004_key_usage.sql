-- Last-used stamps move out of `api_keys` into a table of their own, as on PostgreSQL (where
-- rewriting wide rows made large flushes slow); here it keeps both schemas and their queries
-- alike. No foreign key: keys are never deleted. api_keys.last_used_at and last_client_addr
-- are no longer written; reads show the newer of the two.
CREATE TABLE api_key_usage (
    key_id           INTEGER PRIMARY KEY,
    last_used_at     INTEGER NOT NULL,
    last_client_addr TEXT
);

INSERT INTO api_key_usage (key_id, last_used_at, last_client_addr)
SELECT id, last_used_at, last_client_addr FROM api_keys WHERE last_used_at IS NOT NULL;

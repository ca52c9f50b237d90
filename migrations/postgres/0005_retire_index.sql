-- Every sidecar's auto-retire sweep (every database.refresh_interval) asks for the active keys
-- that have a replacement and a retire rule. Without this index that read every key: with a
-- million keys, a full scan of api_keys every 2 s on every sidecar.
CREATE INDEX api_keys_retiring ON api_keys (id)
    WHERE replaced_by IS NOT NULL AND revoked_at IS NULL AND retire_after_idle_ms IS NOT NULL;

-- Many sidecars, one database. Every insert or update that matters to authentication (the
-- same columns the *_touch triggers watch) is announced on the `keygate_changes` channel as
-- `KIND:ID:UPDATED_AT` (KIND `s` for api_keys, `g` for gateways); PostgreSQL delivers it when
-- the transaction commits. Each sidecar records a heartbeat row in `sidecars`.

CREATE FUNCTION keygate_notify_change() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN
    PERFORM pg_notify('keygate_changes', TG_ARGV[0] || ':' || NEW.id || ':' || NEW.updated_at);
    RETURN NULL;
END $$;

CREATE TRIGGER api_keys_notify
    AFTER INSERT OR UPDATE OF key_hash, scopes, expires_at, revoked_at, name ON api_keys
    FOR EACH ROW EXECUTE FUNCTION keygate_notify_change('s');
CREATE TRIGGER gateways_notify
    AFTER INSERT OR UPDATE OF prefix, api_key_hash, scopes, unpaired_at, name ON gateways
    FOR EACH ROW EXECUTE FUNCTION keygate_notify_change('g');

CREATE TABLE sidecars (
    id           TEXT   PRIMARY KEY,
    host         TEXT   NOT NULL,
    version      TEXT   NOT NULL,
    started_at   BIGINT NOT NULL,
    seen_at      BIGINT NOT NULL,
    watermark    BIGINT NOT NULL,
    table_age_ms BIGINT,
    keys         BIGINT NOT NULL
);
CREATE INDEX sidecars_seen_at ON sidecars (seen_at);

-- keygate schema, PostgreSQL. Times are Unix milliseconds (BIGINT), as on SQLite, so both
-- engines share one set of queries. `updated_at` is the change marker the key table refreshes
-- from: set by the database (triggers below), strictly increasing per row, and bumped only by
-- changes that matter to authentication.

CREATE FUNCTION keygate_now_ms() RETURNS BIGINT LANGUAGE sql VOLATILE AS
$$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;

CREATE FUNCTION keygate_touch() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN NEW.updated_at := GREATEST(keygate_now_ms(), OLD.updated_at + 1); RETURN NEW; END $$;

CREATE TABLE service_accounts (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT   NOT NULL UNIQUE,
    description TEXT   NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL,
    created_by  TEXT   NOT NULL
);

CREATE TABLE api_keys (
    id               BIGSERIAL PRIMARY KEY,
    account_id       BIGINT NOT NULL REFERENCES service_accounts (id),
    prefix           TEXT   NOT NULL UNIQUE,
    key_hash         TEXT   NOT NULL,
    name             TEXT   NOT NULL,
    scopes           TEXT   NOT NULL,
    created_at       BIGINT NOT NULL,
    created_by       TEXT   NOT NULL,
    expires_at       BIGINT,
    revoked_at       BIGINT,
    revoked_by       TEXT,
    last_used_at     BIGINT,
    last_client_addr TEXT,
    updated_at       BIGINT NOT NULL DEFAULT keygate_now_ms(),
    UNIQUE (account_id, name)
);
CREATE INDEX api_keys_updated_at ON api_keys (updated_at);
CREATE TRIGGER api_keys_touch BEFORE UPDATE OF key_hash, scopes, expires_at, revoked_at, name ON api_keys
    FOR EACH ROW EXECUTE FUNCTION keygate_touch();

CREATE TABLE gateways (
    id           BIGSERIAL PRIMARY KEY,
    name         TEXT   NOT NULL UNIQUE,
    prefix       TEXT   UNIQUE,
    api_key_hash TEXT,
    scopes       TEXT   NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    created_by   TEXT   NOT NULL,
    paired_at    BIGINT,
    paired_by    TEXT,
    unpaired_at  BIGINT,
    last_seen_at BIGINT,
    updated_at   BIGINT NOT NULL DEFAULT keygate_now_ms()
);
CREATE INDEX gateways_updated_at ON gateways (updated_at);
CREATE TRIGGER gateways_touch BEFORE UPDATE OF prefix, api_key_hash, scopes, unpaired_at, name ON gateways
    FOR EACH ROW EXECUTE FUNCTION keygate_touch();

CREATE TABLE users (
    id            BIGSERIAL PRIMARY KEY,
    email         TEXT   NOT NULL UNIQUE,
    password_hash TEXT   NOT NULL,
    role          TEXT   NOT NULL CHECK (role IN ('owner', 'admin', 'operator', 'viewer')),
    created_at    BIGINT NOT NULL,
    disabled_at   BIGINT
);

CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor_type  TEXT   NOT NULL,
    actor_id    TEXT,
    action      TEXT   NOT NULL,
    key_prefix  TEXT,
    scopes      TEXT,
    detail      TEXT   NOT NULL DEFAULT '{}',
    client_addr TEXT
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_key_prefix ON audit_log (key_prefix);

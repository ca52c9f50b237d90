-- keygate schema, SQLite. Times are Unix milliseconds (INTEGER). `updated_at` is the change
-- marker the key table refreshes from: set by the database (triggers below), strictly
-- increasing per row, and bumped only by changes that matter to authentication.

CREATE TABLE service_accounts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE,
    description TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    created_by  TEXT    NOT NULL
);

CREATE TABLE api_keys (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id       INTEGER NOT NULL REFERENCES service_accounts (id),
    prefix           TEXT    NOT NULL UNIQUE,
    key_hash         TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    scopes           TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,
    created_by       TEXT    NOT NULL,
    expires_at       INTEGER,
    revoked_at       INTEGER,
    revoked_by       TEXT,
    last_used_at     INTEGER,
    last_client_addr TEXT,
    updated_at       INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    UNIQUE (account_id, name)
);
CREATE INDEX api_keys_updated_at ON api_keys (updated_at);

CREATE TRIGGER api_keys_touch AFTER UPDATE OF key_hash, scopes, expires_at, revoked_at, name ON api_keys
BEGIN
    UPDATE api_keys
       SET updated_at = MAX(CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), OLD.updated_at + 1)
     WHERE id = NEW.id;
END;

CREATE TABLE gateways (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL UNIQUE,
    prefix       TEXT    UNIQUE,
    api_key_hash TEXT,
    scopes       TEXT    NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    created_by   TEXT    NOT NULL,
    paired_at    INTEGER,
    paired_by    TEXT,
    unpaired_at  INTEGER,
    last_seen_at INTEGER,
    updated_at   INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);
CREATE INDEX gateways_updated_at ON gateways (updated_at);

CREATE TRIGGER gateways_touch AFTER UPDATE OF prefix, api_key_hash, scopes, unpaired_at, name ON gateways
BEGIN
    UPDATE gateways
       SET updated_at = MAX(CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), OLD.updated_at + 1)
     WHERE id = NEW.id;
END;

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    email         TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    role          TEXT    NOT NULL CHECK (role IN ('owner', 'admin', 'operator', 'viewer')),
    created_at    INTEGER NOT NULL,
    disabled_at   INTEGER
);

CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    actor_type  TEXT    NOT NULL,
    actor_id    TEXT,
    action      TEXT    NOT NULL,
    key_prefix  TEXT,
    scopes      TEXT,
    detail      TEXT    NOT NULL DEFAULT '{}',
    client_addr TEXT
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_key_prefix ON audit_log (key_prefix);

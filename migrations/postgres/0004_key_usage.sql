-- Last-used stamps move out of `api_keys` into a narrow table of their own. A flush of 100,000
-- stamps used to rewrite 100,000 wide `api_keys` rows: on full pages there is no room for a
-- HOT update, so each stamp wrote its new row version elsewhere plus an entry in each of the
-- four indexes, and after every checkpoint a full-page image of most of the table went to the
-- WAL. Rows here are about 60 bytes with one index, and pages are filled only halfway, so a
-- key's next stamp fits beside its previous version (a HOT update, no index entry) once that
-- version is pruned. The in-memory key table never reads stamps: a full load does not join
-- this table.
--
-- No foreign key to api_keys: keys are never deleted, and the check would lock the key's row
-- (writing to an api_keys page) at every key's first stamp.
--
-- api_keys.last_used_at and last_client_addr stay: sidecars of earlier versions keep writing
-- them during a rolling upgrade, and reads show the newer of the two. A later migration can
-- drop them once no such sidecar runs.
CREATE TABLE api_key_usage (
    key_id           BIGINT PRIMARY KEY,
    last_used_at     BIGINT NOT NULL,
    last_client_addr TEXT
) WITH (fillfactor = 50);

INSERT INTO api_key_usage (key_id, last_used_at, last_client_addr)
SELECT id, last_used_at, last_client_addr FROM api_keys WHERE last_used_at IS NOT NULL;

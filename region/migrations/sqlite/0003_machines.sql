-- Machines by MAC and what each boots next; racks get this table with the catalogue.
CREATE TABLE machines (
    mac TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    -- JSON of metalrack_api::machines::BootAction
    boot_json TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

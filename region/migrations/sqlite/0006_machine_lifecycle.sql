-- Machines get a lifecycle (metalrack_api::machines::MachineState), power settings and the
-- deploy agent's jobs. SQLite cannot drop NOT NULL from a column, so the table is rebuilt:
-- `boot_json` becomes optional (only machines an operator gave a bare boot decision with
-- `PUT /machines/{mac}` have one). Rows from before keep their MAC, hostname and decision, get
-- an id (8 lower-case hex digits, within the id alphabet) and start as `new`.
CREATE TABLE machines_lifecycle (
    mac TEXT PRIMARY KEY,
    -- 8 random lower-case letters and digits: what the API and the agent name it by.
    id TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    -- JSON of metalrack_api::machines::BootAction: the legacy bare decision, served while the
    -- machine runs no lifecycle job; NULL for machines without one.
    boot_json TEXT,
    -- metalrack_api::machines::MachineState::as_str
    state TEXT NOT NULL,
    status_message TEXT NOT NULL,
    -- The rack whose network it boots from; NULL: every rack serves it (legacy rows).
    rack_id TEXT REFERENCES racks (id) ON DELETE SET NULL,
    -- JSON of metalrack_api::power::PowerParameters, password included: stored only here (the
    -- database file is private to the region's user) and sent only to the machine's rack.
    power_json TEXT,
    -- metalrack_api::power::PowerState as its snake_case word.
    power_state TEXT NOT NULL,
    power_checked_at_ms BIGINT,
    -- JSON of metalrack_api::agent::ImageRef: the image deployed or being deployed.
    image_json TEXT,
    disk TEXT,
    -- JSON of metalrack_api::agent::AgentJob while a job runs (commission, deploy, release with
    -- erase), and its token (32 hex, new per job): reports with another token are ignored.
    job_json TEXT,
    job_token TEXT,
    -- JSON of metalrack_api::agent::DeployProgress, the agent's last figures.
    progress_json TEXT,
    -- The last report of the current job (the stall timer measures from it).
    last_progress_at_ms BIGINT,
    -- JSON of metalrack_api::agent::Inventory.
    inventory_json TEXT,
    -- When the deploy was asked for: deploys waiting for a slot start in this order.
    deploy_requested_at_ms BIGINT,
    state_changed_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
INSERT INTO machines_lifecycle (mac, id, hostname, boot_json, state, status_message, power_state,
    state_changed_at_ms, updated_at_ms)
    SELECT mac, lower(hex(randomblob(4))), hostname, boot_json, 'new', '', 'unknown', updated_at_ms, updated_at_ms
    FROM machines;
DROP TABLE machines;
ALTER TABLE machines_lifecycle RENAME TO machines;
CREATE INDEX machines_by_state ON machines (state);
CREATE INDEX machines_by_rack ON machines (rack_id);

-- Events about one machine name it, so its event list is a query, not a text search.
ALTER TABLE events ADD COLUMN machine_id TEXT;
CREATE INDEX events_by_machine ON events (machine_id, id);

-- What the region asks racks to do to machines' power, until the rack answers. A request sent
-- and not answered within the resend interval is sent again (the rack or its answer was lost).
CREATE TABLE power_requests (
    id INTEGER PRIMARY KEY,
    rack_id TEXT NOT NULL REFERENCES racks (id) ON DELETE CASCADE,
    machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    -- JSON array of metalrack_api::power::PowerAction
    actions_json TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    sent_at_ms BIGINT,
    done BIGINT NOT NULL
);
CREATE INDEX power_requests_pending ON power_requests (rack_id, done, id);

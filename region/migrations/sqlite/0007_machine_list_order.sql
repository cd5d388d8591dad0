-- The machine list pages by hostname (`ORDER BY hostname, id LIMIT .. OFFSET ..`): without an
-- index each page sorted every machine (10,000 at a large site) to return 100.
CREATE INDEX machines_by_hostname ON machines (hostname, id);

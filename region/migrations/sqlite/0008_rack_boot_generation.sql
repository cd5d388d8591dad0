-- A rack's boot generation: raised in the same transaction as every change to one of its
-- machines that the rack must hear of (a new boot decision), and sent with its catalogue (read
-- before the machines) and with each power request (read when the request is taken). The rack
-- powers a machine on only once its boot table is of that generation or newer, so a machine
-- never boots what the rack was told before the change that asked for the power-on.
ALTER TABLE racks ADD COLUMN boot_generation BIGINT NOT NULL DEFAULT 0;

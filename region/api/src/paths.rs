//! The API's endpoint paths, below [`crate::API_PREFIX`]: the region routes on these templates
//! and clients build URLs with the functions, so a path cannot be spelled two ways.
//!
//! Templates use axum's `{name}` segments.

/// Where the region lives under its host, as in MAAS: `http://HOST:5240/MAAS/`.
pub const BASE_PATH: &str = "/MAAS";

// Rack registration and the calls only racks make (`Authorization: Rack ID:CREDENTIAL`).
pub const RACK_CHALLENGE: &str = "/racks/challenge";
pub const RACK_REGISTER: &str = "/racks/register";
pub const RACK_HEARTBEAT: &str = "/racks/heartbeat";
pub const RACK_CATALOGUE: &str = "/rack/catalogue";
pub const RACK_MANIFEST: &str = "/rack/manifests/{id}";
pub const RACK_CHUNKS: &str = "/rack/chunks";
pub const RACK_EVENTS: &str = "/rack/events";
pub const RACK_SNAPSHOT: &str = "/rack/snapshot";
/// `GET`: the power requests for this rack's machines (long-poll, `?wait_ms=`); `POST`: a result.
pub const RACK_POWER: &str = "/rack/power";

// Users and tools (`Authorization: Bearer KEY`).
pub const RACKS: &str = "/racks";
pub const RACK_SYNC: &str = "/racks/{id}/sync";
pub const RACK_SYNC_POLICY: &str = "/racks/{id}/sync-policy";
pub const SYNC_ALL: &str = "/sync";
pub const EVENTS: &str = "/events";
pub const ACCOUNT: &str = "/account";
pub const UPLOADS: &str = "/uploads";
pub const UPLOAD_CHUNKS: &str = "/uploads/{id}/chunks";
pub const UPLOAD_COMMIT: &str = "/uploads/{id}/commit";
pub const IMAGES: &str = "/images";
pub const IMAGE_VERSION: &str = "/images/{image_id}/versions/{version}";
pub const MACHINES: &str = "/machines";
/// `GET` a machine (by id or MAC); `PUT` by MAC sets a bare boot decision (no lifecycle);
/// `PATCH` edits; `DELETE` removes.
pub const MACHINE: &str = "/machines/{machine}";
pub const MACHINE_COMMISSION: &str = "/machines/{machine}/commission";
pub const MACHINE_DEPLOY: &str = "/machines/{machine}/deploy";
pub const MACHINE_RELEASE: &str = "/machines/{machine}/release";
pub const MACHINE_POWER: &str = "/machines/{machine}/power";
pub const MACHINE_MARK_BROKEN: &str = "/machines/{machine}/mark-broken";
pub const MACHINE_MARK_FIXED: &str = "/machines/{machine}/mark-fixed";
pub const MACHINE_ABORT: &str = "/machines/{machine}/abort";
pub const MACHINE_EVENTS: &str = "/machines/{machine}/events";
/// The OpenAPI document of this API (JSON).
pub const OPENAPI: &str = "/openapi.json";
/// The region's Prometheus metrics (text format), for any API key.
pub const METRICS: &str = "/metrics";

/// `template` with its one `{...}` segment replaced by `value`.
fn fill(template: &str, value: &str) -> String {
    let start = template.find('{').expect("template has a segment");
    let end = template[start..].find('}').expect("segment is closed") + start;
    format!("{}{value}{}", &template[..start], &template[end + 1..])
}

pub fn rack_manifest(manifest_id: &str) -> String {
    fill(RACK_MANIFEST, manifest_id)
}

pub fn rack_sync(rack_id: &str) -> String {
    fill(RACK_SYNC, rack_id)
}

pub fn rack_sync_policy(rack_id: &str) -> String {
    fill(RACK_SYNC_POLICY, rack_id)
}

pub fn machine(machine: &str) -> String {
    fill(MACHINE, machine)
}

/// A machine's action path: `machine_path(MACHINE_DEPLOY, "abcd1234")`.
pub fn machine_path(template: &str, machine: &str) -> String {
    fill(template, machine)
}

pub fn upload_chunks(upload_id: &str) -> String {
    fill(UPLOAD_CHUNKS, upload_id)
}

pub fn upload_commit(upload_id: &str) -> String {
    fill(UPLOAD_COMMIT, upload_id)
}

pub fn image_version(image_id: &str, version: &str) -> String {
    fill(&fill(IMAGE_VERSION, image_id), version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_paths_replace_every_segment() {
        assert_eq!(rack_manifest("ab12"), "/rack/manifests/ab12");
        assert_eq!(upload_chunks("u1"), "/uploads/u1/chunks");
        assert_eq!(upload_commit("u1"), "/uploads/u1/commit");
        assert_eq!(rack_sync("r1"), "/racks/r1/sync");
        assert_eq!(rack_sync_policy("r1"), "/racks/r1/sync-policy");
        assert_eq!(machine("52-54-00-aa-bb-01"), "/machines/52-54-00-aa-bb-01");
        assert_eq!(image_version("i1", "2"), "/images/i1/versions/2");
    }
}

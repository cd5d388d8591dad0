//! The OpenAPI document of the region's JSON API, generated from the handlers' annotations and
//! the wire types' schemas (`metalrack-api` with its `openapi` feature), served at
//! `/MAAS/api/v1/openapi.json` and committed as `docs/openapi.json` (a test keeps the two equal).

use axum::response::IntoResponse;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Metalrack region API",
        description = "The region's JSON API: users and tools authenticate with `Authorization: Bearer API_KEY`; \
                       racks with `Authorization: Rack RACK_ID:CREDENTIAL` after registering.",
    ),
    servers((url = "/MAAS/api/v1")),
    paths(
        super::racks::challenge,
        super::racks::register,
        super::racks::heartbeat,
        super::racks::put_snapshot,
        super::racks::list_racks,
        super::racks::sync_rack,
        super::racks::sync_all,
        super::racks::set_sync_policy,
        super::users::list_events,
        super::users::account,
        super::catalogue::start_upload,
        super::catalogue::upload_chunks,
        super::catalogue::commit_upload,
        super::catalogue::list_images,
        super::catalogue::delete_version,
        super::catalogue::rack_catalogue,
        super::catalogue::rack_manifest,
        super::catalogue::rack_chunks,
        super::machines::list_machines,
        super::machines::add_machine,
        super::machines::get_machine,
        super::machines::put_machine,
        super::machines::edit_machine,
        super::machines::delete_machine,
        super::machines::commission,
        super::machines::deploy,
        super::machines::release,
        super::machines::power,
        super::machines::mark_broken,
        super::machines::mark_fixed,
        super::machines::abort,
        super::machines::machine_events,
        super::machines::rack_events,
        super::machines::rack_power,
        super::machines::rack_power_result,
        super::metrics::scrape,
        document,
    ),
    modifiers(&Security),
    tags(
        (name = "machines", description = "Machines: lifecycle, power, deploys"),
        (name = "images", description = "The image catalogue and uploads"),
        (name = "racks", description = "Rack controllers and their sync"),
        (name = "users", description = "Accounts"),
        (name = "events", description = "The event log"),
        (name = "rack protocol", description = "Calls only racks make"),
        (name = "monitoring", description = "Prometheus metrics"),
    )
)]
pub struct ApiDoc;

/// The two ways to authenticate.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("A user's API key")).build(),
            ),
        );
        components.add_security_scheme(
            "rack",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "`Rack RACK_ID:CREDENTIAL`, from registration",
            ))),
        );
    }
}

/// The document as JSON, as served and committed.
pub fn json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes") + "\n"
}

/// This document (public: it holds no data, only the API's shape).
#[utoipa::path(get, path = metalrack_api::paths::OPENAPI, tag = "users", responses((status = 200, description = "this document (OpenAPI 3.1, JSON)")))]
pub async fn document() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], json())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regenerate with `EXPECTORATE=overwrite cargo test -p metalrack-region openapi`.
    #[test]
    fn the_committed_openapi_document_is_the_generated_one() {
        expectorate::assert_contents("../docs/openapi.json", &json());
    }

    /// Every endpoint path of the wire contract is documented: a new path without an annotated
    /// handler listed in [`ApiDoc`] fails here.
    #[test]
    fn every_path_of_the_wire_contract_is_in_the_document() {
        let document: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let documented = document["paths"].as_object().unwrap();
        let source = include_str!("../../../api/src/paths.rs");
        let mut missing = Vec::new();
        for line in source.lines() {
            let Some(rest) = line.trim().strip_prefix("pub const ") else { continue };
            let Some((name, value)) = rest.split_once(": &str = ") else { continue };
            let path = value.trim_end_matches(';').trim_matches('"');
            if name == "BASE_PATH" {
                continue;
            }
            if !documented.contains_key(path) {
                missing.push(format!("{name} ({path})"));
            }
        }
        assert!(missing.is_empty(), "paths with no documented handler: {missing:?}");
    }
}

//! Counting requests for `/metrics`: each answered request by its matched route template (never
//! the raw path: unknown paths share one label), method and status, with its latency.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::metrics::{RegionMetrics, ROUTE_UNMATCHED};

/// The route label of a request: the template its route was registered with, or
/// [`ROUTE_UNMATCHED`] when none matched (axum's own catch-all templates for fallbacks included).
pub fn route_label(matched: Option<&MatchedPath>) -> &str {
    match matched.map(MatchedPath::as_str) {
        Some(template) if !template.contains("__private__") => template,
        _ => ROUTE_UNMATCHED,
    }
}

/// Counts the request once its response head is ready. Added with `Router::layer`, which axum
/// applies to each route after routing, so the matched template is in the extensions.
pub async fn count_request(State(metrics): State<Arc<RegionMetrics>>, request: Request, next: Next) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>()).to_owned();
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.observe_request(&route, &method, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

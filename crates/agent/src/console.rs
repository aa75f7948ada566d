//! The web console: its files, built from `web/` by `build.rs` and embedded in the binary,
//! served at `/` (same origin as the API; the page itself asks for the credential and
//! presents it on each API call). Hash routes (`#/vms/NAME`) keep every page at `/`.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

include!(concat!(env!("OUT_DIR"), "/console_files.rs"));

/// Looks a console file up by its path under the root.
pub fn file(name: &str) -> Option<(&'static str, &'static [u8])> {
    FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, m, b)| (*m, *b))
}

fn serve(name: &str, immutable: bool) -> Response {
    let Some((mime, body)) = file(name) else {
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    };
    let cache = if immutable {
        // Vite names assets by content hash.
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, cache),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
        ],
        body,
    )
        .into_response()
}

pub async fn index() -> Response {
    serve("index.html", false)
}

pub async fn favicon() -> Response {
    serve("favicon.svg", false)
}

pub async fn asset(Path(file): Path<String>) -> Response {
    if !contract::auth::is_console_asset(&format!("/assets/{file}")) {
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    }
    serve(&format!("assets/{file}"), true)
}

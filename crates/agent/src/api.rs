//! The REST API (axum). Every operation runs on a blocking thread; errors are JSON
//! `{"error": "..."}` with 400 (bad input), 404 (unknown), 409 (state conflict), 503 (store or
//! peer unavailable), 500; with `--api-tokens`, 401 (no or unknown credential) and 403 (a role
//! that does not allow the request) before anything runs.

use crate::{Agent, AgentError};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use contract::api::{
    CreateVm, Deleted, DrainRequest, ErrorBody, Health, MigrateRequest, MigrationEvent,
    ReceiveRequest, Schedulable,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let code = match &self {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            code,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, AgentError>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("worker thread failed: {e}")))?
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, AgentError> {
    if body.is_empty() {
        return serde_json::from_str("{}")
            .map_err(|e| AgentError::BadRequest(format!("a JSON body is required: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| AgentError::BadRequest(format!("bad JSON body: {e}")))
}

/// Checks the request's credential and the access `contract::auth::access_for` says it
/// needs; answers 401/403 with a JSON body, and changes nothing, otherwise. A credential is a
/// client certificate of the cluster CA that the HTTPS handshake verified (a node's: the
/// `node` grant; a user's: its role), or else a bearer token from the tokens file. An agent
/// with neither HTTPS nor a tokens file serves an open API (it warned at start).
async fn authorize(
    State(a): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let deny = |code: StatusCode, error: String| (code, Json(ErrorBody { error })).into_response();
    let access = contract::auth::access_for(req.method().as_str(), req.uri().path());
    if access == contract::auth::Access::Public {
        return next.run(req).await;
    }
    let peer = req.extensions().get::<crate::https::Peer>().cloned();
    if let Some(crate::https::Peer(Some(id))) = &peer {
        let grant = match id {
            trust::Identity::Node(_) => contract::auth::Grant::Node,
            trust::Identity::User { role, .. } => contract::auth::Grant::from(*role),
        };
        if !grant.allows(access) {
            return deny(
                StatusCode::FORBIDDEN,
                format!(
                    "{} {}: certificate {id} has grant {grant}, which does not allow {access:?}",
                    req.method(),
                    req.uri().path(),
                ),
            );
        }
        return next.run(req).await;
    }
    let Some(tokens) = &a.cfg.api_tokens else {
        if peer.is_some() {
            return deny(
                StatusCode::UNAUTHORIZED,
                "a credential is required: a client certificate of the cluster CA (ferry --cert/--key; ferry pki issue --user)".into(),
            );
        }
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return deny(
            StatusCode::UNAUTHORIZED,
            "a credential is required: `Authorization: Bearer <token>` (ferry --token, FERRY_TOKEN; ferry token issue) or a client certificate of the cluster CA".into(),
        );
    };
    let Some(entry) = trust::token::lookup(tokens, presented) else {
        return deny(StatusCode::UNAUTHORIZED, "unknown token".into());
    };
    if !entry.role.allows(access) {
        return deny(
            StatusCode::FORBIDDEN,
            format!(
                "{} {}: token {:?} has role {}, which does not allow {access:?}",
                req.method(),
                req.uri().path(),
                entry.name,
                entry.role
            ),
        );
    }
    next.run(req).await
}

/// The router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}/drain", post(drain))
        .route("/v1/nodes/{name}/undrain", post(undrain))
        .route("/v1/vms", get(vms).post(create_vm))
        .route("/v1/vms/{name}", get(vm).put(edit_vm).delete(delete_vm))
        .route("/v1/vms/{name}/targets", get(targets))
        .route("/v1/vms/{name}/serial", get(serial))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/migrations", get(migrations))
        .route("/v1/migrations/{id}", get(migration))
        .route("/v1/migrations/{id}/events", get(migration_events))
        .route("/v1/migrations/{id}/cancel", post(cancel))
        .route("/v1/internal/receive", post(receive))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(crate::console::index))
        .route("/index.html", get(crate::console::index))
        .route("/favicon.svg", get(crate::console::favicon))
        .route("/assets/{file}", get(crate::console::asset))
        .fallback(|| async { AgentError::NotFound("no such API path (see /openapi.json)".into()) })
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            authorize,
        ))
        .with_state(agent)
}

async fn health(State(a): State<Arc<Agent>>) -> Json<Health> {
    Json(Health {
        node: a.name().to_string(),
        ok: true,
        listen: a.cfg.listen.clone(),
    })
}

async fn nodes(State(a): State<Arc<Agent>>) -> ApiResult<Vec<contract::api::NodeView>> {
    blocking(move || a.nodes_view().map(Json)).await
}

async fn drain(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<contract::api::DrainReport> {
    check_node(&name)?;
    let req: DrainRequest = parse(&body)?;
    blocking(move || {
        let c = req
            .concurrency
            .unwrap_or(a.cfg.drain_concurrency)
            .min(a.cfg.max_outgoing);
        a.drain(&name, c).map(Json)
    })
    .await
}

async fn undrain(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<Schedulable> {
    check_node(&name)?;
    blocking(move || {
        a.node_or_404(&name)?;
        a.store.set_schedulable(&name, true)?;
        Ok(Json(Schedulable {
            node: name,
            schedulable: true,
        }))
    })
    .await
}

async fn vms(State(a): State<Arc<Agent>>) -> ApiResult<Vec<cluster::VmRecord>> {
    blocking(move || Ok(Json(a.store.vms()?.into_iter().map(|v| v.value).collect()))).await
}

async fn create_vm(
    State(a): State<Arc<Agent>>,
    body: Bytes,
) -> Result<(StatusCode, Json<cluster::VmRecord>), AgentError> {
    use cluster::SpecExt;
    let req: CreateVm = parse(&body)?;
    let spec = match (req.spec, req.toml) {
        (Some(s), None) => s,
        (None, Some(t)) => {
            cluster::VmSpec::from_toml(&t).map_err(|e| AgentError::BadRequest(e.to_string()))?
        }
        _ => {
            return Err(AgentError::BadRequest(
                "give the VM spec either as `spec` (JSON) or as `toml`".into(),
            ))
        }
    };
    if let Some(n) = &req.node {
        check_node(n)?;
    }
    let rec = blocking(move || a.create_vm(spec, req.node)).await?;
    Ok((StatusCode::CREATED, Json(rec)))
}

fn check_name(name: &str) -> Result<(), AgentError> {
    if cluster::valid_name(name) {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!("invalid VM name {name:?}")))
    }
}

fn check_node(name: &str) -> Result<(), AgentError> {
    if cluster::valid_name(name) {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!(
            "invalid node name {name:?}"
        )))
    }
}

fn check_id(id: &str) -> Result<(), AgentError> {
    if cluster::valid_migration_id(id) {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!(
            "invalid migration id {id:?}"
        )))
    }
}

async fn vm(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<contract::api::VmView> {
    check_name(&name)?;
    blocking(move || a.vm_view(&name).map(Json)).await
}

async fn edit_vm(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<cluster::VmRecord> {
    check_name(&name)?;
    let edit: contract::api::VmEdit = parse(&body)?;
    blocking(move || a.edit_vm(&name, &edit).map(Json)).await
}

async fn targets(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<contract::api::Targets> {
    check_name(&name)?;
    blocking(move || a.targets(&name).map(Json)).await
}

async fn serial(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<contract::api::SerialTail> {
    check_name(&name)?;
    blocking(move || a.serial_tail(&name).map(Json)).await
}

async fn delete_vm(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<Deleted> {
    check_name(&name)?;
    blocking(move || a.delete_vm(&name).map(|_| Json(Deleted { deleted: name }))).await
}

async fn start_vm(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<cluster::VmRecord> {
    check_name(&name)?;
    blocking(move || a.start_vm(&name).map(Json)).await
}

async fn stop_vm(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<cluster::VmRecord> {
    check_name(&name)?;
    blocking(move || a.stop_vm(&name).map(Json)).await
}

async fn migrate(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<contract::api::MigrationStarted> {
    check_name(&name)?;
    let req: MigrateRequest = parse(&body)?;
    check_node(&req.to)?;
    blocking(move || a.migrate(&name, req).map(Json)).await
}

async fn migrations(State(a): State<Arc<Agent>>) -> ApiResult<Vec<cluster::MigrationRecord>> {
    blocking(move || Ok(Json(a.store.migrations()?))).await
}

async fn migration(
    State(a): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<contract::api::MigrationView> {
    check_id(&id)?;
    blocking(move || a.migration_view(&id).map(Json)).await
}

async fn cancel(
    State(a): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<contract::api::CancelReply> {
    check_id(&id)?;
    blocking(move || a.cancel_migration(&id).map(Json)).await
}

async fn receive(
    State(a): State<Arc<Agent>>,
    body: Bytes,
) -> ApiResult<contract::api::ReceiveReply> {
    let req: ReceiveRequest = parse(&body)?;
    blocking(move || a.receive(req).map(Json)).await
}

/// Progress of a migration as server-sent events: `progress` every 100 ms while it runs, then
/// one `done` with the final record.
async fn migration_events(
    State(a): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, AgentError> {
    check_id(&id)?;
    let watch = a.migrations.get(&id);
    if watch.is_none() {
        // Not running here: it must at least exist.
        let a2 = a.clone();
        let id2 = id.clone();
        blocking(move || a2.migration_view(&id2)).await?;
    }
    let state = (a, id, watch, false);
    let stream = futures_util::stream::unfold(state, |(a, id, watch, ended)| async move {
        if ended {
            return None;
        }
        let (ev, done) = match &watch {
            Some(w) => {
                if w.done.load(Ordering::SeqCst) {
                    (
                        MigrationEvent::Done {
                            migration: Box::new(w.record()),
                        },
                        true,
                    )
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let r = w.record();
                    (
                        MigrationEvent::Progress {
                            phase: r.phase,
                            progress: w.progress().unwrap_or_default(),
                        },
                        false,
                    )
                }
            }
            None => {
                let a2 = a.clone();
                let id2 = id.clone();
                let v = tokio::task::spawn_blocking(move || a2.migration_view(&id2)).await;
                match v {
                    Ok(Ok(v)) if v.done => (
                        MigrationEvent::Done {
                            migration: Box::new(v.migration),
                        },
                        true,
                    ),
                    Ok(Ok(v)) => {
                        // Running, but not on this agent: the view relays the source agent's
                        // progress when it answers, else the store's phase alone.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        (
                            MigrationEvent::Progress {
                                phase: v.migration.phase,
                                progress: v.progress.unwrap_or_default(),
                            },
                            false,
                        )
                    }
                    _ => (
                        MigrationEvent::Error {
                            error: "migration record unavailable".into(),
                        },
                        true,
                    ),
                }
            }
        };
        let data = serde_json::to_string(&ev).unwrap_or_default();
        Some((Ok(Event::default().data(data)), (a, id, watch, done)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn metrics(State(a): State<Arc<Agent>>) -> Response {
    let text = tokio::task::spawn_blocking(move || {
        let vms = a.store.vms().unwrap_or_default();
        let here = vms
            .iter()
            .filter(|v| v.value.owner == a.name() && v.value.state == cluster::VmState::Running)
            .count();
        let nodes = a.store.nodes().unwrap_or_default();
        let alive = nodes.iter().filter(|n| n.alive).count();
        a.metrics.render(&[
            (
                "ferry_vms_running",
                "VMs running on this node.",
                here as f64,
            ),
            ("ferry_cluster_vms", "VMs in the cluster.", vms.len() as f64),
            (
                "ferry_cluster_nodes_alive",
                "Nodes whose lease is alive.",
                alive as f64,
            ),
            (
                "ferry_cluster_nodes",
                "Nodes registered.",
                nodes.len() as f64,
            ),
        ])
    })
    .await
    .unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

async fn openapi() -> Json<Value> {
    Json(openapi_doc())
}

/// The OpenAPI 3 description of this API.
pub fn openapi_doc() -> Value {
    let err = json!({ "description": "error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let ok = |d: &str| json!({ "description": d, "content": { "application/json": {} } });
    let name =
        json!([{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let id =
        json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    json!({
        "openapi": "3.0.3",
        "info": { "title": "Ferry agent API", "version": env!("CARGO_PKG_VERSION") },
        "paths": {
            "/v1/health": { "get": { "summary": "Agent liveness", "responses": { "200": ok("node name") } } },
            "/v1/nodes": { "get": { "summary": "Nodes with liveness and use", "responses": { "200": ok("nodes"), "503": err } } },
            "/v1/nodes/{name}/drain": { "post": { "summary": "Live-migrate every VM off a node (blocks until done)", "parameters": name,
                "requestBody": { "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Drain" } } } },
                "responses": { "200": ok("drain report"), "404": err, "503": err } } },
            "/v1/nodes/{name}/undrain": { "post": { "summary": "Return a node to service", "parameters": name, "responses": { "200": ok("node"), "404": err } } },
            "/v1/vms": {
                "get": { "summary": "VMs", "responses": { "200": ok("VM records") } },
                "post": { "summary": "Create a VM (stopped)", "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CreateVm" } } } },
                    "responses": { "201": ok("VM record"), "400": err, "404": err, "409": err } } },
            "/v1/vms/{name}": {
                "get": { "summary": "A VM, its worker status and recent migrations", "parameters": name, "responses": { "200": ok("VM"), "404": err } },
                "put": { "summary": "Change a stopped VM (vcpus, memory_mib, cpu_profile)", "parameters": name,
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/VmEdit" } } } },
                    "responses": { "200": ok("VM record"), "400": err, "404": err, "409": err } },
                "delete": { "summary": "Delete a stopped VM", "parameters": name, "responses": { "200": ok("deleted"), "404": err, "409": err } } },
            "/v1/vms/{name}/targets": { "get": { "summary": "Every other node's preflight verdict for the VM (a dry run; nothing recorded)", "parameters": name, "responses": { "200": ok("verdicts"), "404": err } } },
            "/v1/vms/{name}/serial": { "get": { "summary": "The end of the VM's serial console log (16 KiB)", "parameters": name, "responses": { "200": ok("serial tail"), "404": err } } },
            "/v1/vms/{name}/start": { "post": { "summary": "Start a VM on its owner node", "parameters": name, "responses": { "200": ok("VM record"), "404": err, "409": err } } },
            "/v1/vms/{name}/stop": { "post": { "summary": "Stop a VM", "parameters": name, "responses": { "200": ok("VM record"), "404": err, "409": err } } },
            "/v1/vms/{name}/migrate": { "post": { "summary": "Start a live migration (preflight refusals answer 409 before anything moves)", "parameters": name,
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Migrate" } } } },
                "responses": { "200": ok("migration record and the agent that runs it"), "400": err, "404": err, "409": err } } },
            "/v1/migrations": { "get": { "summary": "Migration records, newest first", "responses": { "200": ok("records") } } },
            "/v1/migrations/{id}": { "get": { "summary": "A migration (live progress on the source agent)", "parameters": id, "responses": { "200": ok("record"), "404": err } } },
            "/v1/migrations/{id}/events": { "get": { "summary": "Server-sent events: progress every 100 ms, then done", "parameters": id,
                "responses": { "200": { "description": "event stream", "content": { "text/event-stream": {} } }, "404": err } } },
            "/v1/migrations/{id}/cancel": { "post": { "summary": "Cancel a migration before its commit point", "parameters": id, "responses": { "200": ok("cancelling"), "404": err, "409": err } } },
            "/v1/internal/receive": { "post": { "summary": "(agent to agent) start a worker waiting for an incoming VM", "responses": { "200": ok("address"), "409": err } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text exposition format" } } } }
        },
        "components": { "schemas": {
            "Error": { "type": "object", "properties": { "error": { "type": "string" } }, "required": ["error"] },
            "CreateVm": { "type": "object", "properties": {
                "toml": { "type": "string", "description": "VM spec as TOML (name, vcpus, memory_mib, kernel, initrd, cmdline, cpu_profile, [[disks]] path, [[nics]] network/mac)" },
                "spec": { "type": "object", "description": "VM spec as JSON (same fields)" },
                "node": { "type": "string", "description": "owner node (default: the agent asked)" } } },
            "Migrate": { "type": "object", "required": ["to"], "properties": {
                "to": { "type": "string", "description": "destination node" },
                "dry_run": { "type": "boolean", "description": "only run the agent's preflight" },
                "params": { "$ref": "#/components/schemas/MigrationParams" } } },
            "MigrationParams": { "type": "object", "properties": {
                "max_downtime_ms": { "type": "integer", "default": contract::migration::DEFAULT_MAX_DOWNTIME_MS, "minimum": 1, "maximum": contract::migration::MAX_DOWNTIME_MS },
                "streams": { "type": "integer", "default": contract::migration::DEFAULT_STREAMS, "minimum": 1, "maximum": contract::migration::MAX_STREAMS },
                "compression": { "type": "string", "enum": ["none", "lz4", "zstd"], "default": "none" },
                "max_bandwidth_mibs": { "type": "integer", "minimum": 1, "description": "bandwidth cap for the memory copy, MiB/s" },
                "timeout_s": { "type": "number", "description": "give up after this long (the VM stays on its source)" } } },
            "VmEdit": { "type": "object", "properties": {
                "vcpus": { "type": "integer", "minimum": 1 },
                "memory_mib": { "type": "integer", "minimum": 1 },
                "cpu_profile": { "type": "string", "enum": ["host", "baseline", "cluster"] } } },
            "Drain": { "type": "object", "properties": { "concurrency": { "type": "integer", "default": 2 } } }
        } }
    })
}

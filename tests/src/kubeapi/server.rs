//! HTTP routing: paths to resource types, verbs to store operations, bearer token
//! authentication, request recording and discovery documents.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    body::{Body, to_bytes},
    extract::{Query, Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    RecordedRequest,
    access::Grants,
    patch::{self, PatchKind},
    resources::{RESOURCES, ResourceType, find},
    selectors::{FieldSelector, LabelSelector},
    status::{ApiError, deleted_status},
    store::{ReadAt, Selection, Store, Subresource},
    tokenreview::{TokenIdentity, Tokens},
    watch::{WatchOptions, WatchSession},
};

const BODY_LIMIT: usize = 16 * 1024 * 1024;

/// State shared by the server and the test's `KubeApi` handle.
pub struct Shared {
    pub store: Mutex<Store>,
    pub tokens: Mutex<Tokens>,
    /// Non-resource URL grants SubjectAccessReviews answer from.
    pub grants: Mutex<Grants>,
    /// Path prefixes answered 500 (the API failing for them).
    pub failing: Mutex<Vec<String>>,
    pub requests: Mutex<Vec<RecordedRequest>>,
    /// Cluster-wide lists and watches that answer 403, as for a user with Roles in some
    /// namespaces only.
    pub cluster_scope_forbidden: Mutex<Vec<ClusterScopeForbidden>>,
    pub bookmark_interval: Duration,
    pub addr: SocketAddr,
}

/// A user whose cluster-wide lists and watches of one resource RBAC forbids.
pub struct ClusterScopeForbidden {
    pub user: String,
    /// The API group, `""` for core.
    pub group: String,
    /// The plural (`deployments`).
    pub resource: String,
}

/// Locks a mutex, recovering the data if a panicking test thread poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match to_bytes(body, BODY_LIMIT).await {
        Ok(body) => body,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let user = bearer_token(&parts.headers).and_then(|token| {
        lock(&shared.tokens)
            .authenticate(token)
            .map(|i| i.username.clone())
    });
    lock(&shared.requests).push(RecordedRequest {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: body.to_vec(),
        user: user.clone(),
    });
    let Some(user) = user else {
        return error_response(&ApiError::unauthorized());
    };
    if lock(&shared.failing)
        .iter()
        .any(|prefix| parts.uri.path().starts_with(prefix.as_str()))
    {
        return error_response(&ApiError::internal(
            "etcdserver: request timed out (the test made this path fail)",
        ));
    }
    let query: HashMap<String, String> = Query::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    if parts.method == Method::GET
        && let Some((group, resource)) = cluster_scope_forbidden(&shared, &user, parts.uri.path())
    {
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = if watch { "watch" } else { "list" };
        return error_response(&ApiError::forbidden_cluster_scope(
            &user, verb, &group, &resource,
        ));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let call = Call {
        method: &parts.method,
        query: &query,
        content_type,
        body: &body,
    };
    match dispatch(&shared, parts.uri.path(), call) {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

/// The `(group, resource)` a path lists cluster-wide (`/api/v1/<resource>`,
/// `/apis/<group>/<version>/<resource>`), if that is forbidden for `user`.
fn cluster_scope_forbidden(shared: &Shared, user: &str, path: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, resource) = match parts.as_slice() {
        ["api", _, resource] => ("", *resource),
        ["apis", group, _, resource] => (*group, *resource),
        _ => return None,
    };
    lock(&shared.cluster_scope_forbidden)
        .iter()
        .find(|f| f.user == user && f.group == group && f.resource == resource)
        .map(|f| (f.group.clone(), f.resource.clone()))
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn error_response(e: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e.to_status(),
    )
}

fn json_response(code: StatusCode, body: Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

struct Call<'a> {
    method: &'a Method,
    query: &'a HashMap<String, String>,
    content_type: Option<&'a str>,
    body: &'a [u8],
}

impl Call<'_> {
    fn json_body(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(self.body).map_err(|e| {
            ApiError::bad_request(format!("the body of the request could not be decoded: {e}"))
        })
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.param(key), Some("true" | "1"))
    }
}

/// What a path names.
#[derive(Debug)]
enum Route {
    Discovery(Value),
    /// List, watch, create, delete collection; `namespace` None is all namespaces.
    Collection {
        rt: &'static ResourceType,
        namespace: Option<String>,
    },
    Object {
        rt: &'static ResourceType,
        namespace: String,
        name: String,
        sub: Subresource,
    },
    /// `serviceaccounts/<name>/token`: create only.
    TokenRequest {
        namespace: String,
        name: String,
    },
}

fn parse_route(path: &str, addr: SocketAddr) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Ok(Route::Discovery(version_doc())),
        ["api"] => {
            return Ok(Route::Discovery(json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
            })));
        }
        ["apis"] => return Ok(Route::Discovery(group_list())),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::unknown_path()),
    };
    if rest.is_empty() {
        return resource_list(group, version)
            .map(Route::Discovery)
            .ok_or_else(ApiError::unknown_path);
    }
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if find(group, version, plural).is_some_and(|rt| rt.namespaced) =>
        {
            (
                Some(ns.to_string()),
                std::iter::once(*plural)
                    .chain(tail.iter().copied())
                    .collect::<Vec<_>>(),
            )
        }
        _ => (None, rest.to_vec()),
    };
    let Some((plural, tail)) = rest.split_first() else {
        return Err(ApiError::unknown_path());
    };
    let rt = find(group, version, plural).ok_or_else(ApiError::unknown_path)?;
    match (tail, namespace) {
        ([], namespace) => Ok(Route::Collection { rt, namespace }),
        (_, None) if rt.namespaced => Err(ApiError::unknown_path()),
        ([name], ns) => Ok(Route::Object {
            rt,
            namespace: ns.unwrap_or_default(),
            name: name.to_string(),
            sub: Subresource::Main,
        }),
        ([name, "token"], Some(namespace)) if rt.plural == "serviceaccounts" => {
            Ok(Route::TokenRequest {
                namespace,
                name: name.to_string(),
            })
        }
        ([name, "status"], ns) if rt.status_subresource => Ok(Route::Object {
            rt,
            namespace: ns.unwrap_or_default(),
            name: name.to_string(),
            sub: Subresource::Status,
        }),
        _ => Err(ApiError::unknown_path()),
    }
}

fn dispatch(shared: &Shared, path: &str, call: Call<'_>) -> Result<Response, ApiError> {
    let route = parse_route(path, shared.addr)?;
    let ok = |v: Value| Ok(json_response(StatusCode::OK, v));
    match route {
        Route::Discovery(doc) if call.method == Method::GET => ok(doc),
        Route::Discovery(_) => Err(ApiError::method_not_allowed()),
        Route::Collection { rt, .. } if rt.create_only => {
            if call.method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let answer = match rt.plural {
                "subjectaccessreviews" => lock(&shared.grants).review(call.json_body()?)?,
                _ => lock(&shared.tokens).review(call.json_body()?)?,
            };
            Ok(json_response(StatusCode::CREATED, answer))
        }
        Route::TokenRequest { namespace, name } => {
            if call.method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let answer = token_request(shared, &namespace, &name, call.json_body()?)?;
            Ok(json_response(StatusCode::CREATED, answer))
        }
        Route::Object { rt, .. } if rt.create_only => Err(ApiError::method_not_allowed()),
        Route::Collection { rt, namespace } => match *call.method {
            Method::GET if call.flag("watch") => watch(shared, rt, namespace, &call),
            Method::GET => ok(list(shared, rt, namespace, &call)?),
            Method::POST => {
                let Some(namespace) = namespace.or_else(|| (!rt.namespaced).then(String::new))
                else {
                    return Err(ApiError::unknown_path());
                };
                let obj = rt.to_storage(call.json_body()?);
                let created = lock(&shared.store).create(rt, &namespace, obj, false)?;
                Ok(json_response(StatusCode::CREATED, rt.to_view(created)))
            }
            Method::DELETE => ok(delete_collection(shared, rt, namespace, &call)?),
            _ => Err(ApiError::method_not_allowed()),
        },
        Route::Object {
            rt,
            namespace,
            name,
            sub,
        } => {
            let mut store = lock(&shared.store);
            match *call.method {
                Method::GET => ok(rt.to_view(store.get(rt, &namespace, &name)?)),
                Method::PUT => {
                    let obj = rt.to_storage(call.json_body()?);
                    ok(rt.to_view(store.update(rt, &namespace, &name, obj, sub)?))
                }
                Method::PATCH => {
                    let kind = PatchKind::from_content_type(call.content_type)?;
                    let patched = store.patch(rt, &namespace, &name, sub, |current| {
                        let served = rt.to_view(current.clone());
                        Ok(rt.to_storage(patch::apply(kind, &served, call.body)?))
                    })?;
                    ok(rt.to_view(patched))
                }
                Method::DELETE if sub == Subresource::Main => {
                    let options = if call.body.is_empty() {
                        json!({})
                    } else {
                        call.json_body()?
                    };
                    let (obj, gone) = store.delete(rt, &namespace, &name, &options)?;
                    if gone && !rt.return_deleted_object {
                        let uid = obj
                            .pointer("/metadata/uid")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        ok(deleted_status(rt, &name, uid))
                    } else {
                        ok(rt.to_view(obj))
                    }
                }
                _ => Err(ApiError::method_not_allowed()),
            }
        }
    }
}

/// Mints a token for ServiceAccount `namespace/name` (which must exist), as the
/// TokenRequest API does: it authenticates as the account, for the requested audiences
/// (none: the API server's), and TokenReviews answer for it. Expiry is not enforced.
fn token_request(
    shared: &Shared,
    namespace: &str,
    name: &str,
    mut request: Value,
) -> Result<Value, ApiError> {
    let accounts =
        super::resources::find("", "v1", "serviceaccounts").ok_or_else(ApiError::unknown_path)?;
    lock(&shared.store).get(accounts, namespace, name)?;
    let audiences: Vec<String> = request
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let seconds = request
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    if seconds < 600 {
        return Err(ApiError::bad_request(
            "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
        ));
    }
    let token = format!("sa-{:032x}", rand::random::<u128>());
    lock(&shared.tokens).insert(
        token.clone(),
        TokenIdentity {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            extra: std::collections::BTreeMap::new(),
            audiences,
        },
    );
    let expires = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(seconds))
        .map_err(|e| ApiError::bad_request(format!("spec.expirationSeconds: {e}")))?;
    if let Some(obj) = request.as_object_mut() {
        obj.insert("apiVersion".into(), json!("authentication.k8s.io/v1"));
        obj.insert("kind".into(), json!("TokenRequest"));
        obj.insert(
            "metadata".into(),
            json!({"name": name, "namespace": namespace, "creationTimestamp": null}),
        );
        obj.insert(
            "status".into(),
            json!({"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()}),
        );
    }
    Ok(request)
}

fn selection(
    rt: &ResourceType,
    namespace: Option<String>,
    call: &Call<'_>,
) -> Result<Selection, ApiError> {
    let labels = LabelSelector::parse(call.param("labelSelector").unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(call.param("fieldSelector").unwrap_or(""), rt.field_labels)
        .map_err(ApiError::bad_request)?;
    Ok(Selection {
        namespace,
        labels,
        fields,
    })
}

fn parse_rv(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {raw:?}")))
}

fn list(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    call: &Call<'_>,
) -> Result<Value, ApiError> {
    let selection = selection(rt, namespace, call)?;
    let limit = call
        .param("limit")
        .map(|l| {
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))
        })
        .transpose()?;
    let at = match (
        call.param("resourceVersion"),
        call.param("resourceVersionMatch"),
    ) {
        (Some(rv), Some("Exact")) => ReadAt::Exact(parse_rv(rv)?),
        (None, Some(m)) => {
            return Err(ApiError::bad_request(format!(
                "resourceVersionMatch \"{m}\" is forbidden unless resourceVersion is provided"
            )));
        }
        _ => ReadAt::Latest,
    };
    let page = lock(&shared.store).list(rt, &selection, limit, call.param("continue"), at)?;
    let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(token) = page.continue_token {
        metadata["continue"] = json!(token);
    }
    if let Some(remaining) = page.remaining {
        metadata["remainingItemCount"] = json!(remaining);
    }
    // Items of a typed list carry no apiVersion/kind, as from the real API server.
    let items: Vec<Value> = page
        .items
        .into_iter()
        .map(|obj| {
            let mut served = rt.to_view(obj);
            if let Some(map) = served.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            served
        })
        .collect();
    Ok(json!({
        "kind": rt.list_kind(),
        "apiVersion": rt.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

fn delete_collection(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    call: &Call<'_>,
) -> Result<Value, ApiError> {
    let selection = selection(rt, namespace, call)?;
    let mut store = lock(&shared.store);
    let page = store.list(rt, &selection, None, None, ReadAt::Latest)?;
    let mut deleted = Vec::new();
    for obj in page.items {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let (last, _) = store.delete(rt, &ns, &name, &json!({}))?;
        deleted.push(rt.to_view(last));
    }
    Ok(json!({
        "kind": rt.list_kind(),
        "apiVersion": rt.api_version(),
        "metadata": {"resourceVersion": ""},
        "items": deleted,
    }))
}

fn watch(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    call: &Call<'_>,
) -> Result<Response, ApiError> {
    let selection = selection(rt, namespace, call)?;
    let send_initial_events = call.flag("sendInitialEvents");
    let bookmarks = call.flag("allowWatchBookmarks");
    if send_initial_events && call.param("resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiError::unprocessable(
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    if send_initial_events && !bookmarks {
        return Err(ApiError::unprocessable(
            "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
        ));
    }
    let from = match call.param("resourceVersion") {
        None | Some("0") => None,
        Some(rv) if send_initial_events => {
            // NotOlderThan with sendInitialEvents: the current state, which is newer.
            parse_rv(rv)?;
            None
        }
        Some(rv) => Some(parse_rv(rv)?),
    };
    let timeout = call
        .param("timeoutSeconds")
        .map(|t| {
            t.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {t:?}")))
        })
        .transpose()?
        .map(Duration::from_secs);
    let options = WatchOptions {
        bookmarks,
        initial_events_end: send_initial_events,
        timeout,
        bookmark_interval: shared.bookmark_interval,
    };
    let start = lock(&shared.store).watch(rt, from);
    let body = match start {
        // A watch from a compacted resourceVersion is a 200 stream holding one ERROR
        // event, as from the API server's watch cache.
        Err(e) => {
            let line = format!("{}\n", json!({"type": "ERROR", "object": e.to_status()}));
            Body::from(line)
        }
        Ok(start) => {
            let session = WatchSession::new(rt, selection, start, options);
            let stream = futures::stream::unfold(session, |mut session| async move {
                let line = session.next_line().await?;
                Some((Ok::<_, std::convert::Infallible>(line), session))
            });
            Body::from_stream(stream)
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn version_doc() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-warmroll-testbed",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn group_list() -> Value {
    let mut groups: Vec<&str> = RESOURCES
        .iter()
        .map(|rt| rt.group)
        .filter(|g| !g.is_empty())
        .collect();
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|g| {
            let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = RESOURCES
        .iter()
        .filter(|rt| rt.group == group && rt.version == version)
        .collect();
    let first = types.first()?;
    let mut resources = Vec::new();
    for rt in &types {
        let verbs: &[&str] = if rt.create_only {
            &["create"]
        } else {
            &[
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        };
        resources.push(json!({
            "name": rt.plural,
            "singularName": rt.kind.to_lowercase(),
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": verbs,
        }));
        if rt.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": first.api_version(),
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> Result<Route, ApiError> {
        parse_route(path, SocketAddr::from(([127, 0, 0, 1], 6443)))
    }

    #[test]
    fn paths_map_to_collections_objects_and_subresources() {
        let Route::Collection { rt, namespace } = route("/api/v1/namespaces/ns/pods").unwrap()
        else {
            panic!("not a collection")
        };
        assert_eq!((rt.plural, namespace.as_deref()), ("pods", Some("ns")));
        let Route::Collection { namespace, .. } = route("/apis/apps/v1/deployments").unwrap()
        else {
            panic!("not a collection")
        };
        assert_eq!(namespace, None);
        let Route::Object {
            rt,
            namespace,
            name,
            sub,
        } = route("/apis/apps/v1/namespaces/ns/deployments/web/status").unwrap()
        else {
            panic!("not an object")
        };
        assert_eq!(
            (rt.kind, namespace.as_str(), name.as_str(), sub),
            ("Deployment", "ns", "web", Subresource::Status)
        );
        let Route::Object {
            namespace, name, ..
        } = route("/api/v1/nodes/n1").unwrap()
        else {
            panic!("not an object")
        };
        assert_eq!((namespace.as_str(), name.as_str()), ("", "n1"));
    }

    #[test]
    fn unknown_paths_and_missing_subresources_are_404() {
        assert_eq!(route("/api/v1/configmaps").unwrap_err().code, 404);
        assert_eq!(
            route("/api/v1/namespaces/ns/secrets/s/status")
                .unwrap_err()
                .code,
            404
        );
        assert_eq!(route("/api/v1/pods/p").unwrap_err().code, 404);
        assert_eq!(route("/apis/apps/v2").unwrap_err().code, 404);
    }

    #[test]
    fn discovery_lists_served_resources() {
        let Route::Discovery(doc) = route("/apis/apps/v1").unwrap() else {
            panic!("not discovery")
        };
        let names: Vec<&str> = doc["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"deployments") && names.contains(&"daemonsets/status"),
            "{names:?}"
        );
        let Route::Discovery(groups) = route("/apis").unwrap() else {
            panic!("not discovery")
        };
        assert!(groups.to_string().contains("coordination.k8s.io/v1"));
    }
}

//! API errors as the real API server reports them: `Status` objects with the reason and
//! code clients key on (`kube::Error::Api` carries them to the caller).

use serde_json::{Value, json};

use super::resources::ResourceType;

/// A failed API call; [`ApiError::to_status`] renders the `Status` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// `details` naming an object the way the API server does (`kind` is the plural).
    fn object_details(rt: &ResourceType, name: &str) -> Value {
        let mut details = json!({"name": name, "kind": rt.plural});
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        details
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", rt.qualified_plural()),
        )
        .with_details(Self::object_details(rt, name))
    }

    /// 404 for a path that names no resource this server serves.
    pub fn unknown_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", rt.qualified_plural()),
        )
        .with_details(Self::object_details(rt, name))
    }

    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                rt.qualified_plural()
            ),
        )
        .with_details(Self::object_details(rt, name))
    }

    /// The optimistic-concurrency conflict: the write named a stale resourceVersion.
    pub fn stale(rt: &ResourceType, name: &str) -> Self {
        Self::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 with one field cause, like `field.Required`/`field.Invalid` errors.
    pub fn invalid(rt: &ResourceType, name: &str, field: &str, cause: FieldCause) -> Self {
        let (reason, detail) = match &cause {
            FieldCause::Required(msg) => ("FieldValueRequired", format!("Required value: {msg}")),
            FieldCause::Invalid { value, msg } => (
                "FieldValueInvalid",
                format!("Invalid value: {}: {msg}", json!(value)),
            ),
        };
        let mut details = json!({
            "name": name,
            "kind": rt.kind,
            "causes": [{"reason": reason, "message": detail, "field": field}],
        });
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {field}: {detail}", rt.kind),
        )
        .with_details(details)
    }

    /// 422 without causes, as for a JSON patch whose operation cannot apply.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 403 as RBAC answers a cluster-wide list or watch that only Roles would allow:
    /// `deployments.apps is forbidden: User "…" cannot list resource "deployments" in
    /// API group "apps" at the cluster scope`.
    pub fn forbidden_cluster_scope(user: &str, verb: &str, group: &str, resource: &str) -> Self {
        // `details` leaves an empty (core) group out, as the API server's omitempty does.
        let (qualified, details) = if group.is_empty() {
            (resource.to_owned(), json!({"kind": resource}))
        } else {
            (
                format!("{resource}.{group}"),
                json!({"group": group, "kind": resource}),
            )
        };
        Self::new(
            403,
            "Forbidden",
            format!(
                "{qualified} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" at the cluster scope"
            ),
        )
        .with_details(details)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object the API server sends for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// Why a field was rejected in a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldCause {
    Required(String),
    Invalid { value: String, msg: String },
}

/// The `Status` a delete answers with when the object is gone at once.
pub fn deleted_status(rt: &ResourceType, name: &str, uid: &str) -> Value {
    let mut details = json!({"name": name, "kind": rt.plural, "uid": uid});
    if !rt.group.is_empty() {
        details["group"] = json!(rt.group);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeapi::resources::find;

    #[test]
    fn not_found_names_the_group_qualified_resource() {
        let rt = find("apps", "v1", "deployments").unwrap();
        let status = ApiError::not_found(rt, "web").to_status();
        assert_eq!(status["message"], "deployments.apps \"web\" not found");
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(status["code"], 404);
        assert_eq!(status["details"]["group"], "apps");
        assert_eq!(status["details"]["kind"], "deployments");
    }

    #[test]
    fn core_resources_have_no_group_in_messages() {
        let rt = find("", "v1", "pods").unwrap();
        let status = ApiError::already_exists(rt, "p").to_status();
        assert_eq!(status["message"], "pods \"p\" already exists");
        assert!(status["details"].get("group").is_none());
    }

    #[test]
    fn invalid_lists_the_field_cause() {
        let rt = find("", "v1", "pods").unwrap();
        let err = ApiError::invalid(
            rt,
            "",
            "metadata.name",
            FieldCause::Required("name or generateName is required".into()),
        );
        let status = err.to_status();
        assert_eq!(status["code"], 422);
        assert_eq!(status["details"]["kind"], "Pod");
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "FieldValueRequired"
        );
        assert_eq!(status["details"]["causes"][0]["field"], "metadata.name");
    }
}

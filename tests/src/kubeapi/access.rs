//! Who may do what on non-resource URLs (`/metrics`, `/report`), and SubjectAccessReview
//! answers from it (pure). RBAC's rules for them: a URL matches a grant's URL exactly, or
//! a grant ending in `*` by prefix; a verb matches exactly or `*`; members of
//! `system:masters` may do anything. Resource attributes are allowed: the stand-in lets
//! every authenticated user do anything with resources.

use serde_json::{Value, json};

use super::status::ApiError;

/// The group RBAC lets do anything.
pub const SUPERUSERS: &str = "system:masters";

/// A grant of `verbs` on non-resource `urls` to a user or group named `subject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonResourceGrant {
    pub subject: String,
    pub verbs: Vec<String>,
    pub urls: Vec<String>,
}

impl NonResourceGrant {
    fn allows(&self, user: &str, groups: &[&str], verb: &str, path: &str) -> bool {
        let subject = self.subject == user || groups.contains(&self.subject.as_str());
        let verb = self.verbs.iter().any(|v| v == "*" || v == verb);
        let url = self.urls.iter().any(|u| match u.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => u == path,
        });
        subject && verb && url
    }
}

/// The grants, in the order given.
#[derive(Debug, Default)]
pub struct Grants(Vec<NonResourceGrant>);

impl Grants {
    pub fn add(&mut self, grant: NonResourceGrant) {
        self.0.push(grant);
    }

    /// The SubjectAccessReview answer: the request with `status` filled in.
    pub fn review(&self, mut request: Value) -> Result<Value, ApiError> {
        let spec = request.get("spec").cloned().unwrap_or(Value::Null);
        let user = spec.get("user").and_then(Value::as_str).unwrap_or("");
        let groups: Vec<&str> = spec
            .get("groups")
            .and_then(Value::as_array)
            .map(|g| g.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if user.is_empty() && groups.is_empty() {
            return Err(ApiError::bad_request(
                "spec.user: Invalid value: at least one of user or group must be specified",
            ));
        }
        let non_resource = spec.get("nonResourceAttributes");
        let resource = spec.get("resourceAttributes");
        let allowed = match (non_resource, resource) {
            (Some(attributes), None) => {
                let path = attributes.get("path").and_then(Value::as_str).unwrap_or("");
                let verb = attributes.get("verb").and_then(Value::as_str).unwrap_or("");
                groups.contains(&SUPERUSERS)
                    || self.0.iter().any(|g| g.allows(user, &groups, verb, path))
            }
            (None, Some(_)) => true,
            _ => {
                return Err(ApiError::bad_request(
                    "spec.resourceAttributes: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
                ));
            }
        };
        if let Some(obj) = request.as_object_mut() {
            obj.insert("status".into(), json!({"allowed": allowed}));
            obj.insert("apiVersion".into(), json!("authorization.k8s.io/v1"));
            obj.insert("kind".into(), json!("SubjectAccessReview"));
            obj.entry("metadata")
                .or_insert_with(|| json!({"creationTimestamp": null}));
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants() -> Grants {
        let mut g = Grants::default();
        g.add(NonResourceGrant {
            subject: "system:serviceaccount:monitoring:prometheus".into(),
            verbs: vec!["get".into()],
            urls: vec!["/metrics".into(), "/fleet/*".into()],
        });
        g.add(NonResourceGrant {
            subject: "readers".into(),
            verbs: vec!["*".into()],
            urls: vec!["/report".into()],
        });
        g
    }

    fn allowed(user: &str, groups: &[&str], verb: &str, path: &str) -> bool {
        let answer = grants()
            .review(json!({"spec": {"user": user, "groups": groups,
                "nonResourceAttributes": {"verb": verb, "path": path}}}))
            .unwrap();
        assert_eq!(answer["kind"], "SubjectAccessReview");
        answer["status"]["allowed"].as_bool().unwrap()
    }

    #[test]
    fn urls_match_exactly_or_by_star_prefix_for_the_granted_user_or_group() {
        let prometheus = "system:serviceaccount:monitoring:prometheus";
        assert!(allowed(prometheus, &[], "get", "/metrics"));
        assert!(allowed(prometheus, &[], "get", "/fleet/nodes/a"));
        assert!(!allowed(prometheus, &[], "get", "/fleet"));
        assert!(!allowed(prometheus, &[], "post", "/metrics"));
        assert!(!allowed(prometheus, &[], "get", "/metricsx"));
        assert!(!allowed("someone", &[], "get", "/metrics"));
        assert!(allowed("someone", &["readers"], "head", "/report"));
        assert!(allowed("admin", &[SUPERUSERS], "get", "/anything"));
    }

    #[test]
    fn resource_attributes_are_allowed_and_malformed_reviews_are_bad_requests() {
        let answer = grants()
            .review(json!({"spec": {"user": "u", "resourceAttributes": {"verb": "get"}}}))
            .unwrap();
        assert_eq!(answer["status"]["allowed"], true);
        assert_eq!(
            grants()
                .review(json!({"spec": {"nonResourceAttributes": {}}}))
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            grants()
                .review(json!({"spec": {"user": "u"}}))
                .unwrap_err()
                .code,
            400
        );
    }
}

//! Bearer tokens the stand-in knows, and TokenReview answers for them (pure).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::status::ApiError;

/// The audience of the API server itself: tokens without explicit audiences have it, and
/// a TokenReview without `spec.audiences` asks for it.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Who a registered token authenticates as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub username: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    pub audiences: Vec<String>,
}

impl TokenIdentity {
    fn audiences(&self) -> Vec<String> {
        if self.audiences.is_empty() {
            vec![API_AUDIENCE.to_string()]
        } else {
            self.audiences.clone()
        }
    }
}

/// Registered tokens. `Debug` shows the identities, never the tokens.
#[derive(Default)]
pub struct Tokens(HashMap<String, TokenIdentity>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.values().map(|i| &i.username))
            .finish()
    }
}

impl Tokens {
    pub fn insert(&mut self, token: String, identity: TokenIdentity) {
        self.0.insert(token, identity);
    }

    /// The identity a bearer token authenticates as against the API itself.
    pub fn authenticate(&self, token: &str) -> Option<&TokenIdentity> {
        self.0
            .get(token)
            .filter(|identity| identity.audiences().iter().any(|a| a == API_AUDIENCE))
    }

    /// The TokenReview answer: the request with `status` filled in. An unknown token or
    /// an audience mismatch is `authenticated` false with an `error`, not an API error.
    pub fn review(&self, mut request: Value) -> Result<Value, ApiError> {
        let token = request
            .pointer("/spec/token")
            .and_then(Value::as_str)
            .unwrap_or("");
        if token.is_empty() {
            return Err(ApiError::bad_request(
                "token is required for TokenReview in authentication",
            ));
        }
        let wanted: Vec<String> = match request.pointer("/spec/audiences").and_then(Value::as_array)
        {
            Some(list) if !list.is_empty() => list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => vec![API_AUDIENCE.to_string()],
        };
        let status = match self.0.get(token) {
            None => json!({"user": {}, "error": "invalid bearer token"}),
            Some(identity) => {
                let granted: Vec<String> = identity
                    .audiences()
                    .into_iter()
                    .filter(|a| wanted.contains(a))
                    .collect();
                if granted.is_empty() {
                    json!({"user": {}, "error": format!(
                        "token audiences {:?} is invalid for the target audiences {:?}",
                        identity.audiences(), wanted
                    )})
                } else {
                    json!({
                        "authenticated": true,
                        "user": {
                            "username": identity.username,
                            "groups": identity.groups,
                            "extra": identity.extra,
                        },
                        "audiences": granted,
                    })
                }
            }
        };
        if let Some(obj) = request.as_object_mut() {
            obj.insert("status".into(), status);
            obj.insert("apiVersion".into(), json!("authentication.k8s.io/v1"));
            obj.insert("kind".into(), json!("TokenReview"));
            obj.entry("metadata")
                .or_insert_with(|| json!({"creationTimestamp": null}));
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        let mut t = Tokens::default();
        t.insert(
            "agent-token".into(),
            TokenIdentity {
                username: "system:serviceaccount:warmroll:agent".into(),
                groups: vec!["system:serviceaccounts".into()],
                extra: BTreeMap::from([(
                    "authentication.kubernetes.io/node-name".into(),
                    vec!["node-1".into()],
                )]),
                audiences: vec!["warmroll".into()],
            },
        );
        t
    }

    fn review(token: &str, audiences: &[&str]) -> Value {
        tokens()
            .review(json!({"spec": {"token": token, "audiences": audiences}}))
            .unwrap()
    }

    #[test]
    fn known_token_with_matching_audience_is_authenticated() {
        let answer = review("agent-token", &["warmroll"]);
        assert_eq!(answer["status"]["authenticated"], true);
        assert_eq!(
            answer["status"]["user"]["username"],
            "system:serviceaccount:warmroll:agent"
        );
        assert_eq!(
            answer["status"]["user"]["extra"]["authentication.kubernetes.io/node-name"][0],
            "node-1"
        );
        assert_eq!(answer["status"]["audiences"], json!(["warmroll"]));
    }

    #[test]
    fn wrong_audience_and_unknown_tokens_are_not_authenticated() {
        let answer = review("agent-token", &["other"]);
        assert!(answer["status"].get("authenticated").is_none());
        assert!(
            answer["status"]["error"]
                .as_str()
                .unwrap()
                .contains("audiences")
        );
        assert!(review("nope", &["warmroll"])["status"]["error"].is_string());
        // No spec.audiences means the API server's audience, which this token lacks.
        assert!(
            review("agent-token", &[])["status"]
                .get("authenticated")
                .is_none()
        );
    }

    #[test]
    fn only_api_audience_tokens_authenticate_api_calls() {
        let mut t = tokens();
        assert!(t.authenticate("agent-token").is_none());
        t.insert(
            "admin".into(),
            TokenIdentity {
                username: "admin".into(),
                groups: vec![],
                extra: BTreeMap::new(),
                audiences: vec![],
            },
        );
        assert_eq!(t.authenticate("admin").unwrap().username, "admin");
        assert!(!format!("{t:?}").contains("agent-token"));
    }

    #[test]
    fn empty_token_is_a_bad_request() {
        assert_eq!(tokens().review(json!({"spec": {}})).unwrap_err().code, 400);
    }
}

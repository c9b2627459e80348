//! Workloads' `imagePullSecrets`, the template's and those of the ServiceAccount its
//! pods run as (the admission plugin adds those to every pod): read (GET, cached for a
//! minute) so their credentials resolve the workload's tags and travel with its warm
//! orders. Without permission to read a Secret or ServiceAccount (the chart grants it
//! only with `rbac.readSecrets`), or when it is missing or unreadable, the workload goes
//! on without those credentials after one warning.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{Api, Client};
use tracing::warn;

use crate::registry::Keyring;
use crate::workload::Workload;

/// How long a read Secret (or its absence) is reused.
const TTL: Duration = Duration::from_secs(60);

type SecretKey = (String, String);

/// Pull secrets read so far.
#[derive(Default)]
pub(crate) struct PullSecrets {
    cache: HashMap<SecretKey, (Option<Secret>, Timestamp)>,
    /// ServiceAccounts' `imagePullSecrets` names, by (namespace, account).
    accounts: HashMap<SecretKey, (Vec<String>, Timestamp)>,
    warned: BTreeSet<SecretKey>,
}

fn fresh(at: Timestamp, now: Timestamp) -> bool {
    Duration::try_from(now.duration_since(at)).is_ok_and(|age| age < TTL)
}

impl PullSecrets {
    /// The keyring of one workload's pull secrets (empty when it has none).
    pub(crate) async fn keyring(&mut self, client: &Client, workload: &Workload) -> Keyring {
        let mut keyring = Keyring::new();
        let ns = &workload.key.namespace;
        let mut names = workload.pull_secrets.clone();
        for name in self.account_secrets(client, workload).await {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        for name in &names {
            let key = (ns.clone(), name.clone());
            let now = Timestamp::now();
            let fresh = self.cache.get(&key).is_some_and(|(_, at)| fresh(*at, now));
            if !fresh {
                let secret = match Api::<Secret>::namespaced(client.clone(), ns)
                    .get_opt(name)
                    .await
                {
                    Ok(Some(secret)) => Some(secret),
                    Ok(None) => {
                        self.warn_once(&key, workload, "not found".to_owned());
                        None
                    }
                    Err(e) => {
                        self.warn_once(&key, workload, e.to_string());
                        None
                    }
                };
                self.cache.insert(key.clone(), (secret, now));
            }
            if let Some((Some(secret), _)) = self.cache.get(&key)
                && let Err(e) = keyring.add_pull_secret(secret)
            {
                self.warn_once(&key, workload, e.to_string());
            }
        }
        keyring
    }

    /// The `imagePullSecrets` names of the workload's ServiceAccount; none when it has
    /// none or cannot be read (warned once).
    async fn account_secrets(&mut self, client: &Client, workload: &Workload) -> Vec<String> {
        let ns = &workload.key.namespace;
        let key = (ns.clone(), workload.service_account.clone());
        let now = Timestamp::now();
        if let Some((names, at)) = self.accounts.get(&key)
            && fresh(*at, now)
        {
            return names.clone();
        }
        let names = match Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .get_opt(&workload.service_account)
            .await
        {
            Ok(account) => account
                .and_then(|a| a.image_pull_secrets)
                .into_iter()
                .flatten()
                .map(|r| r.name)
                .collect(),
            Err(e) => {
                if self
                    .warned
                    .insert((format!("serviceaccount {ns}"), key.1.clone()))
                {
                    warn!(
                        workload = %workload.key,
                        service_account = %format!("{}/{}", key.0, key.1),
                        reason = %e,
                        "cannot read the ServiceAccount's imagePullSecrets; going on without them"
                    );
                }
                Vec::new()
            }
        };
        self.accounts.insert(key, (names.clone(), now));
        names
    }

    fn warn_once(&mut self, key: &SecretKey, workload: &Workload, reason: String) {
        if self.warned.insert(key.clone()) {
            warn!(
                workload = %workload.key,
                secret = %format!("{}/{}", key.0, key.1),
                reason = %reason,
                "cannot use the pull secret; going on without its credentials"
            );
        }
    }
}

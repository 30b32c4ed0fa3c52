//! Executes a [`Plan`](crate::plan::Plan)'s writes: server-side apply with the one field
//! manager `derp-operator` (forced: we own the fields we set), deletes for pruning and Pod
//! replacement; consecutive writes of one phase run concurrently. The plan already skipped unchanged objects, so this module never decides
//! *whether* to write, only how.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Pod, Secret},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::debug;

use crate::{Error, crd::FIELD_MANAGER, metrics::Metrics, plan::Write};

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    api.patch(&obj.name_any(), &apply_params(), &Patch::Apply(obj))
        .await
        .map(|_| ())
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// How many writes of one phase are in flight at once.
pub const WRITE_CONCURRENCY: usize = 8;

/// Phase of a write: consecutive writes of the same phase are independent of each other and
/// run concurrently; phases run in the plan's order (Secrets → ConfigMaps → Pods → prune).
fn phase(w: &Write) -> u8 {
    match w {
        Write::ApplySecret(_) => 0,
        Write::ApplyConfigMap(_) => 1,
        Write::ApplyPdb(_) | Write::CreatePod(_) | Write::DeletePod { .. } => 2,
        Write::DeleteSecret(_) | Write::DeleteConfigMap(_) => 3,
    }
}

/// Execute `writes` in plan order (concurrently within a run of one phase) in namespace `ns`,
/// counting each in `metrics`. Stops at the first failed run.
pub async fn execute(
    client: &Client,
    ns: &str,
    writes: Vec<Write>,
    metrics: &Metrics,
) -> Result<(), Error> {
    let apis = Apis {
        secrets: Api::namespaced(client.clone(), ns),
        cms: Api::namespaced(client.clone(), ns),
        pods: Api::namespaced(client.clone(), ns),
        pdbs: Api::namespaced(client.clone(), ns),
    };
    let mut writes = writes.into_iter().peekable();
    while let Some(first) = writes.next() {
        let p = phase(&first);
        let mut run = vec![first];
        while let Some(w) = writes.next_if(|w| phase(w) == p) {
            run.push(w);
        }
        futures::stream::iter(run.into_iter().map(|w| execute_one(&apis, w, metrics)))
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
    }
    Ok(())
}

struct Apis {
    secrets: Api<Secret>,
    cms: Api<ConfigMap>,
    pods: Api<Pod>,
    pdbs: Api<PodDisruptionBudget>,
}

async fn execute_one(apis: &Apis, w: Write, metrics: &Metrics) -> Result<(), Error> {
    let Apis {
        secrets,
        cms,
        pods,
        pdbs,
    } = apis;
    match w {
        Write::ApplySecret(s) => {
            let name = s.name_any();
            debug!(secret = %name, "applying secret");
            metrics.write("Secret", "apply");
            apply(secrets, &s)
                .await
                .map_err(|source| Error::ApplySecret { name, source })
        }
        Write::ApplyConfigMap(c) => {
            let name = c.name_any();
            debug!(configmap = %name, "applying configmap");
            metrics.write("ConfigMap", "apply");
            apply(cms, &c)
                .await
                .map_err(|source| Error::ApplyConfigMap { name, source })
        }
        Write::CreatePod(p) => {
            let name = p.name_any();
            debug!(pod = %name, "creating relay pod");
            metrics.write("Pod", "apply");
            apply(pods, &p)
                .await
                .map_err(|source| Error::CreatePod { name, source })
        }
        Write::ApplyPdb(p) => {
            let name = p.name_any();
            debug!(pdb = %name, "applying relay poddisruptionbudget");
            metrics.write("PodDisruptionBudget", "apply");
            apply(pdbs, &p)
                .await
                .map_err(|source| Error::ApplyPdb { name, source })
        }
        Write::DeletePod { name, reason } => {
            debug!(pod = %name, reason, "deleting relay pod");
            metrics.write("Pod", "delete");
            delete(pods, &name)
                .await
                .map_err(|source| Error::DeletePod { name, source })
        }
        Write::DeleteSecret(name) => {
            debug!(secret = %name, "pruning secret");
            metrics.write("Secret", "delete");
            delete(secrets, &name)
                .await
                .map_err(|source| Error::DeleteSecret { name, source })
        }
        Write::DeleteConfigMap(name) => {
            debug!(configmap = %name, "pruning configmap");
            metrics.write("ConfigMap", "delete");
            delete(cms, &name)
                .await
                .map_err(|source| Error::DeleteConfigMap { name, source })
        }
    }
}

//! Leader election with a `coordination.k8s.io/v1` Lease, client-go style: acquire when the
//! Lease is free or expired, renew every `retry_period`, step down when a renewal has not
//! succeeded within `renew_deadline`, release (empty holder) on shutdown.
//!
//! Optimistic concurrency comes from `replace` with the observed `resourceVersion`: two
//! candidates racing for an expired Lease cannot both win (the loser gets 409).
//! Owns: the Lease object only. The controller is started/stopped by `main`.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tracing::{info, warn};

/// Leader-election failures that are not simply "someone else leads".
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reading, creating or updating the Lease failed.
    #[error("update Lease {name}: {source}")]
    UpdateLease {
        /// Lease name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// Timing of the election (client-go defaults: 15 s / 10 s / 2 s).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This candidate's identity (the Pod name).
    pub identity: String,
    /// How long a Lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// Step down when no renewal succeeded for this long.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

/// A Lease-based elector.
#[derive(Debug, Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

enum Attempt {
    Acquired,
    HeldByOther,
}

impl LeaderElector {
    /// New elector for `cfg` using `client`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    fn err(&self) -> impl Fn(kube::Error) -> LeaseError + '_ {
        move |source| LeaseError::UpdateLease {
            name: self.cfg.name.clone(),
            source,
        }
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn try_acquire_or_renew(&self) -> Result<Attempt, LeaseError> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await.map_err(self.err())? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Acquired),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldByOther),
                Err(e) => Err(self.err()(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.cfg.identity;
        let duration =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0 + duration < now);
        if !ours && !holder.is_empty() && !expired {
            return Ok(Attempt::HeldByOther);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquire = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(now, acquire, transitions));
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Acquired),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldByOther),
            Err(e) => Err(self.err()(e)),
        }
    }

    /// Wait until this candidate holds the Lease, then keep renewing it in the background.
    /// The returned receiver turns `false` when leadership is lost; dropping the returned
    /// guard's sender side is done by [`Leadership::release`].
    pub async fn acquire(&self) -> Leadership {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Acquired) => break,
                Ok(Attempt::HeldByOther) => {}
                Err(error) => warn!(%error, "leader election attempt failed"),
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
        info!(lease = %self.cfg.name, identity = %self.cfg.identity, "acquired leadership");
        let (tx, rx) = watch::channel(true);
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(me.cfg.retry_period).await;
                match me.try_acquire_or_renew().await {
                    Ok(Attempt::Acquired) => last_ok = tokio::time::Instant::now(),
                    Ok(Attempt::HeldByOther) => {
                        warn!("lease taken by another candidate; stepping down");
                        break;
                    }
                    Err(error) => warn!(%error, "lease renewal failed"),
                }
                if last_ok.elapsed() > me.cfg.renew_deadline {
                    warn!("lease not renewed within the deadline; stepping down");
                    break;
                }
            }
            let _ = tx.send(false);
        });
        Leadership {
            elector: self.clone(),
            lost: rx,
            renewer: task,
        }
    }
}

/// Held leadership: renewed in the background until lost or released.
#[derive(Debug)]
pub struct Leadership {
    elector: LeaderElector,
    lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Resolves when leadership is lost.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.lost.clone();
        async move {
            let _ = rx.wait_for(|leading| !*leading).await;
        }
    }

    /// Stop renewing and hand the Lease back (empty holder), so a successor need not wait for
    /// it to expire.
    pub async fn release(self) -> Result<(), LeaseError> {
        self.renewer.abort();
        let e = &self.elector;
        let Some(mut lease) = e.api.get_opt(&e.cfg.name).await.map_err(e.err())? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(e.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        e.api
            .replace(&e.cfg.name, &PostParams::default(), &lease)
            .await
            .map_err(e.err())?;
        info!(lease = %e.cfg.name, "released leadership");
        Ok(())
    }
}

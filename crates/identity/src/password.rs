//! Password hashing: Argon2id, m=19456 KiB, t=2, p=1 (OWASP's minimum), run
//! on the blocking pool so a hash never stalls the async workers, and at
//! most `concurrency` at once (the number of cores by default): a login
//! flood queues for a permit, asynchronously, instead of taking up to 512
//! blocking threads of 19 MiB each and the CPU the reads need.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use keel_kernel::{Error, Result, Secret};
use tokio::sync::Semaphore;

use crate::model::HashedPassword;

#[derive(Clone)]
pub struct PasswordHasher {
    params: Params,
    // Verified against when the account does not exist, so that an unknown
    // email costs the same time (and waits for the same permits) as a wrong
    // password.
    dummy: Arc<OnceLock<HashedPassword>>,
    permits: Arc<Semaphore>,
}

impl Default for PasswordHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// The default bound: one hash per core but one, so that a flood of
/// sign-ins leaves a core to every other call (at least one hash at a time).
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().saturating_sub(1).max(1))
}

impl PasswordHasher {
    pub fn new() -> Self {
        Self::with_concurrency(default_concurrency())
    }

    /// At most `concurrency` (at least 1) hashes or verifications at once.
    pub fn with_concurrency(concurrency: usize) -> Self {
        let params = Params::new(19_456, 2, 1, None).unwrap_or_default();
        Self {
            params,
            dummy: Arc::new(OnceLock::new()),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    fn argon2(params: Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    /// Runs `work` on the blocking pool once a permit is free. The permit
    /// goes with the work, not with the caller: a caller that gives up (a
    /// cancelled request) does not free it while its hash still runs.
    async fn bounded<T: Send + 'static>(&self, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("password hashing is closed"))?;
        tokio::task::spawn_blocking(move || {
            let result = work();
            drop(permit);
            result
        })
        .await
        .map_err(Error::internal)?
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
    pub async fn hash(&self, password: &Secret<String>) -> Result<HashedPassword> {
        let params = self.params.clone();
        let password = password.clone();
        self.bounded(move || {
            let salt = SaltString::generate(&mut OsRng);
            Self::argon2(params)
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|hash| HashedPassword::new(hash.to_string()))
                .map_err(|error| Error::internal(format!("hashing failed: {error}")))
        })
        .await
    }

    /// True when `password` matches `stored`. Malformed hashes are internal errors.
    pub async fn verify(&self, password: &Secret<String>, stored: &HashedPassword) -> Result<bool> {
        let params = self.params.clone();
        let password = password.clone();
        let stored = stored.clone();
        self.bounded(move || {
            let parsed = PasswordHash::new(stored.as_str())
                .map_err(|error| Error::internal(format!("stored hash unreadable: {error}")))?;
            Ok(Self::argon2(params)
                .verify_password(password.expose().as_bytes(), &parsed)
                .is_ok())
        })
        .await
    }

    /// Spends the time of one verification, for an account that does not
    /// exist: the same work, under the same bound.
    pub async fn verify_dummy(&self, password: &Secret<String>) -> Result<()> {
        let dummy = match self.dummy.get() {
            Some(dummy) => dummy.clone(),
            None => {
                let hash = self.hash(&Secret::new("keel dummy password".to_owned())).await?;
                self.dummy.get_or_init(|| hash).clone()
            }
        };
        self.verify(password, &dummy).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_with_the_required_cost_and_verify() {
        let hasher = PasswordHasher::new();
        let secret = Secret::new("correct horse battery staple".to_owned());
        let hash = hasher.hash(&secret).await.expect("hash");
        assert!(
            hash.as_str().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            hash.as_str()
        );
        assert_eq!(format!("{hash:?}"), "[redacted]");
        assert!(hasher.verify(&secret, &hash).await.expect("verify"));
        assert!(
            !hasher
                .verify(&Secret::new("wrong".to_owned()), &hash)
                .await
                .expect("verify")
        );
    }

    /// Many callers at once: never more than `concurrency` pieces of work
    /// run together, and all of them finish. Without the semaphore all
    /// sixteen would run at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_than_the_bound_run_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        let hasher = PasswordHasher::with_concurrency(2);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let hasher = hasher.clone();
                let (running, most) = (running.clone(), most.clone());
                tokio::spawn(async move {
                    hasher
                        .bounded(move || {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            running.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        for caller in callers {
            caller.await.expect("caller").expect("work");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    /// A caller that gives up keeps its permit until its work ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_caller_holds_its_permit_until_the_work_ends() {
        let hasher = PasswordHasher::with_concurrency(1);
        let (started, started_rx) = std::sync::mpsc::channel();
        let (finish, finish_rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let hasher = hasher.clone();
            tokio::spawn(async move {
                hasher
                    .bounded(move || {
                        let _ = started.send(());
                        let _ = finish_rx.recv();
                        Ok(())
                    })
                    .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .expect("join")
            .expect("started");
        first.abort();
        let second = hasher.bounded(|| Ok(()));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), second)
                .await
                .is_err(),
            "the first work still runs: no permit for the second"
        );
        let _ = finish.send(());
        tokio::time::timeout(std::time::Duration::from_secs(5), hasher.bounded(|| Ok(())))
            .await
            .expect("a permit once the first work ended")
            .expect("work");
    }
}

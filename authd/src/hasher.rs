//! Argon2id for token secrets, on a bounded pool.
//!
//! One verify costs ~16 ms of a core at the OWASP minimum (`MEASURED.md`), so this work runs on
//! tokio's blocking threads, never on the async workers, and is capped twice:
//! - `run`: at most one verify per core at a time;
//! - `admission`: at most [`QUEUE_PER_CORE`] more waiting per core. When that is full a cold
//!   validation is refused at once ([`Busy`], gRPC `RESOURCE_EXHAUSTED`, the proxy's 503) instead
//!   of queueing without bound behind a flood of random tokens. Warm (cached) validations never
//!   come here, so they never wait behind cold ones.

use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// OWASP minimum for Argon2id: 19 MiB, 2 passes, 1 lane.
pub const M_COST_KIB: u32 = 19_456;
pub const T_COST: u32 = 2;
pub const P_COST: u32 = 1;
/// Cold validations allowed to wait per core once every core is busy verifying.
pub const QUEUE_PER_CORE: usize = 1;
/// New-token hashes running at once (one core at most, whatever the machine).
pub const CREATE_WORKERS: usize = 1;
/// Creations allowed to wait for [`CREATE_WORKERS`]; past this, RESOURCE_EXHAUSTED.
pub const CREATE_QUEUE: usize = 32;

/// The Argon2 pool is saturated: refuse now, the caller may retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("argon2 pool saturated")]
pub struct Busy;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2: {0}")]
    Argon2(String),
    #[error("argon2 worker failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn argon() -> Result<Argon2<'static>, HashError> {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None)
        .map_err(|e| HashError::Argon2(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a secret into an Argon2id PHC string with a fresh random salt (blocking: ~16 ms).
pub fn hash_blocking(secret: &str) -> Result<String, HashError> {
    let hash = argon()?
        .hash_password(secret.as_bytes())
        .map_err(|e| HashError::Argon2(e.to_string()))?;
    Ok(hash.to_string())
}

/// Verifies a secret against a PHC string (blocking: ~16 ms). Any parse error is "no".
pub fn verify_blocking(secret: &str, phc: &str) -> bool {
    let Ok(argon) = argon() else { return false };
    match PasswordHash::new(phc) {
        Ok(hash) => argon.verify_password(secret.as_bytes(), &hash).is_ok(),
        Err(_) => false,
    }
}

/// The bounded Argon2 pool plus the dummy hash that unknown ids are verified against.
#[derive(Clone)]
pub struct HashPool {
    run: Arc<Semaphore>,
    admission: Arc<Semaphore>,
    create_run: Arc<Semaphore>,
    create_admission: Arc<Semaphore>,
    dummy: Arc<str>,
}

/// A reserved place in the creation queue, held for the whole CreateToken call.
pub struct Creation {
    run: Arc<Semaphore>,
    _permit: OwnedSemaphorePermit,
}

/// A reserved place in the pool; [`Admission::verify`] uses it.
pub struct Admission {
    pool: HashPool,
    permit: OwnedSemaphorePermit,
}

impl HashPool {
    /// A pool sized to `workers` concurrent verifies (normally the core count).
    pub fn new(workers: usize) -> Result<Self, HashError> {
        let workers = workers.max(1);
        // Same parameters as real hashes, so the dummy verify costs exactly what a real one does.
        let dummy = hash_blocking("ibex-dummy-secret-never-issued")?;
        Ok(HashPool {
            run: Arc::new(Semaphore::new(workers)),
            admission: Arc::new(Semaphore::new(workers * (1 + QUEUE_PER_CORE))),
            create_run: Arc::new(Semaphore::new(CREATE_WORKERS)),
            create_admission: Arc::new(Semaphore::new(CREATE_WORKERS + CREATE_QUEUE)),
            dummy: dummy.into(),
        })
    }

    /// Sized to the cores this process may use.
    pub fn for_this_machine() -> Result<Self, HashError> {
        Self::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Reserves a place or refuses at once.
    pub fn admit(&self) -> Result<Admission, Busy> {
        let permit = Arc::clone(&self.admission)
            .try_acquire_owned()
            .map_err(|_| Busy)?;
        Ok(Admission {
            pool: self.clone(),
            permit,
        })
    }

    /// Reserves a place in the creation queue or refuses at once.
    pub fn admit_creation(&self) -> Result<Creation, Busy> {
        let permit = Arc::clone(&self.create_admission)
            .try_acquire_owned()
            .map_err(|_| Busy)?;
        Ok(Creation {
            run: Arc::clone(&self.create_run),
            _permit: permit,
        })
    }
}

impl Creation {
    /// Hashes a new secret on the creation pool (never the validation pool).
    pub async fn hash(&self, secret: SecretString) -> Result<String, HashError> {
        let run = Arc::clone(&self.run)
            .acquire_owned()
            .await
            .map_err(|e| HashError::Argon2(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _run = run;
            hash_blocking(secret.expose_secret())
        })
        .await?
    }
}

impl Admission {
    /// Verifies `secret` against `phc`, or against the dummy hash when `phc` is `None` (unknown
    /// id, malformed token) so that every "no" costs the same.
    pub async fn verify(
        self,
        secret: SecretString,
        phc: Option<String>,
    ) -> Result<bool, HashError> {
        let Admission { pool, permit } = self;
        let run = Arc::clone(&pool.run)
            .acquire_owned()
            .await
            .map_err(|e| HashError::Argon2(e.to_string()))?;
        let dummy = Arc::clone(&pool.dummy);
        tokio::task::spawn_blocking(move || {
            // Both permits live until the work is really done, even if the caller went away.
            let _permits = (permit, run);
            match phc {
                Some(phc) => verify_blocking(secret.expose_secret(), &phc),
                None => {
                    let _ = verify_blocking(secret.expose_secret(), &dummy);
                    false
                }
            }
        })
        .await
        .map_err(HashError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let phc = hash_blocking("s3cret").expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_blocking("s3cret", &phc));
        assert!(!verify_blocking("s3cret!", &phc));
        assert!(!verify_blocking("s3cret", "not a phc string"));
    }

    #[tokio::test]
    async fn saturated_pool_refuses_at_once() {
        let pool = HashPool::new(1).expect("pool");
        let first = pool.admit().expect("first place");
        let second = pool.admit().expect("one queued place per core");
        assert!(matches!(pool.admit(), Err(Busy)));
        drop(first);
        let third = pool.admit().expect("a place was freed");
        let ok = third
            .verify(SecretString::from("x"), None)
            .await
            .expect("dummy verify runs");
        assert!(!ok, "the dummy verify always says no");
        drop(second);
    }

    #[tokio::test]
    async fn creation_has_its_own_bounded_queue() {
        let pool = HashPool::new(1).expect("pool");
        let held: Vec<Creation> = (0..CREATE_WORKERS + CREATE_QUEUE)
            .map(|_| pool.admit_creation().expect("a place"))
            .collect();
        assert!(matches!(pool.admit_creation(), Err(Busy)));
        // Validation admission is untouched by a full creation queue.
        let admission = pool.admit().expect("validation still admitted");
        drop(admission);
        let phc = held[0].hash(SecretString::from("s")).await.expect("hashes");
        assert!(verify_blocking("s", &phc));
        drop(held);
        assert!(pool.admit_creation().is_ok());
    }
}

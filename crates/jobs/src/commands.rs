//! Enqueueing: the kernel's [`JobQueue`] port, which the bus calls inside
//! a command's transaction.

use async_trait::async_trait;
use keel_kernel::{Error, JobQueue, NewJob, Result, clock};
use sea_orm::DatabaseTransaction;
use uuid::Uuid;

use crate::{Jobs, store};

pub struct Enqueuer {
    jobs: Jobs,
}

impl Enqueuer {
    pub fn new(jobs: Jobs) -> Self {
        Self { jobs }
    }
}

#[async_trait]
impl JobQueue for Enqueuer {
    async fn enqueue(&self, tx: &DatabaseTransaction, jobs: Vec<NewJob>) -> Result<Vec<Uuid>> {
        for job in &jobs {
            match self.jobs.kind(job.kind) {
                None => return Err(Error::internal(format!("job kind {} is not registered", job.kind))),
                Some(kind) if kind.queue != job.queue => {
                    return Err(Error::internal(format!(
                        "job kind {} runs on queue {}, not {}",
                        job.kind, kind.queue, job.queue
                    )));
                }
                Some(_) => {}
            }
        }
        store::insert(tx, jobs, clock::now(), self.jobs.channel()).await
    }

    fn committed(&self) {
        self.jobs.wake_all();
    }
}

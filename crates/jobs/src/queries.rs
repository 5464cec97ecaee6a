//! Reading jobs: a job is seen by its owner and by admins; anyone else is
//! told it does not exist.

use async_trait::async_trait;
use keel_kernel::{BusBuilder, Code, Error, Query, QueryContext, QueryHandler, Result};
use uuid::Uuid;

use crate::model::JobRecord;
use crate::{Jobs, store};

pub struct GetJob {
    pub id: Uuid,
}

impl Query for GetJob {
    const NAME: &'static str = "jobs.get_job";
    type Output = JobRecord;
}

struct GetJobHandler;

#[async_trait]
impl QueryHandler<GetJob> for GetJobHandler {
    async fn handle(&self, ctx: &QueryContext<'_>, query: GetJob) -> Result<JobRecord> {
        ctx.request.require_caller()?;
        let not_found = || Error::new(Code::NotFound, "job not found");
        let job = store::get(ctx.db, query.id).await?.ok_or_else(not_found)?;
        // A job of no user is an admin's to see.
        let visible = match job.user_id {
            Some(owner) => ctx.request.may_act_for(owner),
            None => ctx.request.require_admin().is_ok(),
        };
        if !visible {
            return Err(not_found());
        }
        Ok(job)
    }
}

pub(crate) fn register(bus: &mut BusBuilder, _jobs: &Jobs) {
    bus.query(GetJobHandler);
}

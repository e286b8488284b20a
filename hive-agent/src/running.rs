//! The jobs this hive runs now, by id, each with a cancel token; and the task
//! that turns cancel requests (`rbee.cancel.<job id>`, core NATS, sent by
//! `rbee jobs cancel` after it marked the job record) into those tokens.
//!
//! A job registers *before* it writes its record as running, so a cancel
//! request sent after the canceller saw that record always finds the token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use rbee_schemas::subjects;
use tokio_util::sync::CancellationToken;

use crate::lock;

#[derive(Debug, Default)]
pub struct Running {
    jobs: Mutex<HashMap<String, CancellationToken>>,
}

/// Removes the job from [`Running`] when dropped.
#[derive(Debug)]
pub struct Registration {
    running: Arc<Running>,
    job_id: String,
    pub cancelled: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.running.jobs).remove(&self.job_id);
    }
}

impl Running {
    pub fn register(self: &Arc<Self>, job_id: &str) -> Registration {
        let token = CancellationToken::new();
        lock(&self.jobs).insert(job_id.to_owned(), token.clone());
        Registration { running: self.clone(), job_id: job_id.to_owned(), cancelled: token }
    }

    /// Cancels the job if it runs here.
    pub fn cancel(&self, job_id: &str) -> bool {
        match lock(&self.jobs).get(job_id) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.jobs).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Listens for cancel requests until the connection closes.
pub async fn listen(client: async_nats::Client, running: Arc<Running>) -> Result<(), async_nats::SubscribeError> {
    let mut sub = client.subscribe(format!("{}.*", subjects::CANCEL_PREFIX)).await?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let job_id = msg.subject.rsplit('.').next().unwrap_or_default();
            if running.cancel(job_id) {
                tracing::info!(job_id, "cancel requested");
            }
        }
    });
    Ok(())
}

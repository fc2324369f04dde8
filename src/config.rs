//! [`Execution`] and the settings a layer copies into every service it makes.

use std::sync::Arc;
use std::time::Duration;

use crate::limit::Limit;

/// How the tasks of one request run relative to each other.
///
/// ```
/// use tower_background::{BackgroundLayer, Execution};
///
/// let layer = BackgroundLayer::new().execution(Execution::Concurrent);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Execution {
    /// One after another, in the order they were added, each starting when
    /// the previous one has ended (however it ended). FastAPI's behaviour.
    /// All of a request's tasks run on one spawned tokio task.
    #[default]
    Sequential,
    /// All at once: every task of the request starts when the response
    /// finishes, each on its own tokio task.
    Concurrent,
}

/// The settings of a layer, copied into every service it makes.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) execution: Execution,
    pub(crate) timeout: Option<Duration>,
    /// The permits of `max_concurrent_tasks`, shared by every clone.
    pub(crate) limit: Option<Arc<Limit>>,
    pub(crate) run_on_abort: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            execution: Execution::Sequential,
            timeout: None,
            limit: None,
            run_on_abort: true,
        }
    }
}

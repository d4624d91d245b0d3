//! Kubernetes Events, published through kube's [`Recorder`], with the
//! memory it keeps given back once the operator has been quiet long
//! enough.
//!
//! kube's `Recorder` remembers every Event it published for six minutes,
//! so that the same Event again within that window counts up the first
//! one (`series.count`) instead of making another object. It forgets old
//! Events only when it publishes the next one, and its table never shrinks.
//! So after a burst (a thousand domains turning ready in a rollout, or
//! failing over with a data centre) a converged operator that publishes
//! nothing more keeps the whole burst, and the table's room for it, for as
//! long as it runs.
//!
//! [`Events`] starts a new, empty `Recorder` once nothing was published for
//! [`SERIES_WINDOW`], kube's own window, plus [`SLACK`]: by then every
//! Event the old one remembers is one it would drop at its next publish,
//! so repeats are counted up as before. (kube stamps an Event when its
//! publish starts, just after it is handed out here; the slack covers the
//! gap.) [`forget_while_idle`] checks every [`CHECK_EVERY`], so a quiet
//! recorder is gone within [`FORGOTTEN_WITHIN`].

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::{
    Client,
    runtime::events::{Recorder, Reporter},
};
use tokio::time::Instant;

/// How long kube's `Recorder` counts a repeated Event into the first one:
/// its cache's time to live.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// What a recorder must be quiet for beyond [`SERIES_WINDOW`] to be
/// replaced: more than the time between handing it out and kube stamping
/// the Event.
pub const SLACK: Duration = Duration::from_secs(30);

/// How often [`forget_while_idle`] checks whether the operator was quiet.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// The longest a recorder outlives its last Event.
pub const FORGOTTEN_WITHIN: Duration =
    Duration::from_secs(SERIES_WINDOW.as_secs() + SLACK.as_secs() + CHECK_EVERY.as_secs());

/// Publishes Events through one `Recorder` at a time (see the module docs).
pub struct Events {
    client: Client,
    reporter: Reporter,
    state: Mutex<State>,
}

struct State {
    recorder: Recorder,
    /// When an Event was last handed out for publishing; `None` while the
    /// recorder is new.
    last_publish: Option<Instant>,
    /// How many recorders came before this one.
    generation: u64,
}

impl Events {
    /// Events reported by `reporter`, written through `client`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        let recorder = Recorder::new(client.clone(), reporter.clone());
        Self {
            client,
            reporter,
            state: Mutex::new(State {
                recorder,
                last_publish: None,
                generation: 0,
            }),
        }
    }

    /// The recorder to publish an Event through at `now`.
    pub fn recorder(&self, now: Instant) -> Recorder {
        let mut state = self.lock();
        state.last_publish = Some(now);
        state.recorder.clone()
    }

    /// Replaces the recorder with an empty one if nothing was published
    /// for [`SERIES_WINDOW`] plus [`SLACK`] before `now`; whether it did.
    /// Publishes still in flight finish on the old one, which goes when
    /// they do.
    pub fn forget_if_idle(&self, now: Instant) -> bool {
        let mut state = self.lock();
        let idle = state
            .last_publish
            .is_some_and(|last| now.saturating_duration_since(last) >= SERIES_WINDOW + SLACK);
        if idle {
            state.recorder = Recorder::new(self.client.clone(), self.reporter.clone());
            state.last_publish = None;
            state.generation += 1;
        }
        idle
    }

    /// How many times the recorder was replaced.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Calls [`Events::forget_if_idle`] every [`CHECK_EVERY`], for ever: so a
/// recorder is dropped at most [`FORGOTTEN_WITHIN`] after its last Event.
pub async fn forget_while_idle(events: Arc<Events>) {
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if events.forget_if_idle(Instant::now()) {
            tracing::debug!(
                "no Event for six and a half minutes; the recorder's memory is given back"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that is never called: building one connects to nothing.
    fn events() -> Events {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        Events::new(
            client,
            Reporter {
                controller: "test".into(),
                instance: None,
            },
        )
    }

    #[tokio::test]
    async fn a_recorder_that_published_nothing_is_kept() {
        let events = events();
        let later = Instant::now() + SERIES_WINDOW * 10;
        assert!(!events.forget_if_idle(later));
        assert_eq!(events.generation(), 0);
    }

    #[tokio::test]
    async fn the_recorder_is_replaced_only_after_a_whole_quiet_window() {
        let events = events();
        let quiet = SERIES_WINDOW + SLACK;
        let start = Instant::now();
        let _ = events.recorder(start);
        let almost = start + quiet - Duration::from_secs(1);
        assert!(!events.forget_if_idle(almost), "not quiet long enough");
        assert_eq!(events.generation(), 0);

        // Another Event moves the window.
        let _ = events.recorder(almost);
        assert!(!events.forget_if_idle(start + quiet));
        assert_eq!(events.generation(), 0);

        assert!(events.forget_if_idle(almost + quiet));
        assert_eq!(events.generation(), 1);
        assert!(
            !events.forget_if_idle(almost + quiet * 3),
            "a new recorder published nothing yet"
        );
        assert_eq!(events.generation(), 1);
    }

    /// The last Event falls between two checks, as it would in a running
    /// operator: the recorder goes after the quiet time, at the first
    /// check after it, and no later than [`FORGOTTEN_WITHIN`].
    #[tokio::test(start_paused = true)]
    async fn the_sweep_replaces_a_quiet_recorder_at_the_next_check() {
        let events = Arc::new(events());
        let sweep = tokio::spawn(forget_while_idle(events.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let last = Instant::now();
        let _ = events.recorder(last);

        tokio::time::sleep_until(last + SERIES_WINDOW + SLACK - Duration::from_secs(1)).await;
        assert_eq!(events.generation(), 0, "still inside the window");
        tokio::time::sleep_until(last + FORGOTTEN_WITHIN).await;
        assert_eq!(events.generation(), 1, "gone by the bound");
        tokio::time::sleep_until(last + FORGOTTEN_WITHIN * 3).await;
        assert_eq!(events.generation(), 1, "the new recorder published nothing");
        sweep.abort();
    }
}

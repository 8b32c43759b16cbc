//! Filters over the instances a lookup may return, and observe filters over
//! the announcements the cache takes in.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::service::{Chunks, Instance, Instances, Service};

/// A lookup filter: keeps instances that match, or (round-robin) picks one.
///
/// Filters given to the builder apply to every lookup; filters given to one
/// call add to them.
///
/// ```
/// use pubsub_registry::Filter;
/// let filters = [
///     Filter::passing(),
///     Filter::from_fn(|i| i.service.kv.get("zone") == Some("eu-1")),
///     Filter::round_robin(),
/// ];
/// # let _ = filters;
/// ```
#[derive(Clone)]
pub struct Filter(Rule);

#[derive(Clone)]
enum Rule {
    Passing,
    SameHost,
    RoundRobin,
    Custom(Arc<dyn Fn(&Instance) -> bool + Send + Sync>),
}

impl Filter {
    /// Keeps instances whose status is passing.
    pub fn passing() -> Self {
        Filter(Rule::Passing)
    }

    /// Keeps instances on the same host as this registry (its `host_name`).
    pub fn same_host() -> Self {
        Filter(Rule::SameHost)
    }

    /// Load balancing: each lookup returns the next of the matching
    /// instances in turn (a counter per service name; two lookups from two
    /// threads at the very same moment may get the same instance).
    pub fn round_robin() -> Self {
        Filter(Rule::RoundRobin)
    }

    /// Keeps instances for which `f` returns true.
    pub fn from_fn(f: impl Fn(&Instance) -> bool + Send + Sync + 'static) -> Self {
        Filter(Rule::Custom(Arc::new(f)))
    }

    fn keeps(&self, i: &Instance, host: &str) -> bool {
        match &self.0 {
            Rule::Passing => i.is_passing(),
            Rule::SameHost => i.service.host == host,
            Rule::RoundRobin => true,
            Rule::Custom(f) => f(i),
        }
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Rule::Passing => "Filter::passing",
            Rule::SameHost => "Filter::same_host",
            Rule::RoundRobin => "Filter::round_robin",
            Rule::Custom(_) => "Filter::from_fn",
        })
    }
}

/// The turn to take among `len` (more than zero), and the next one after
/// it. A load and a store, not a locked increment: the locked one costs
/// every round-robin lookup about as much as the rest of it, where two
/// threads that read the same turn at once only give one instance a second
/// lookup. No division either: a turn past the end starts again at 0.
#[inline]
fn next_turn(turn: &AtomicUsize, len: usize) -> usize {
    let n = turn.load(Ordering::Relaxed);
    let n = if n < len { n } else { 0 };
    turn.store(n + 1, Ordering::Relaxed);
    n
}

/// The builder's filters and a call's filters, applied as one list without
/// allocating.
#[derive(Clone, Copy)]
pub(crate) struct Chain<'a> {
    pub(crate) defaults: &'a [Filter],
    pub(crate) call: &'a [Filter],
    pub(crate) host: &'a str,
}

impl Chain<'_> {
    fn all(&self) -> impl Iterator<Item = &Filter> {
        self.defaults.iter().chain(self.call)
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.defaults.is_empty() && self.call.is_empty()
    }

    fn keeps(&self, i: &Instance) -> bool {
        self.all().all(|f| f.keeps(i, self.host))
    }

    fn round_robin(&self) -> bool {
        self.all().any(|f| matches!(f.0, Rule::RoundRobin))
    }

    /// One instance: the first that matches, or the next in turn under
    /// round-robin.
    #[inline]
    pub(crate) fn pick<'i>(
        &self,
        instances: &'i Chunks,
        turn: &AtomicUsize,
    ) -> Option<&'i Arc<Instance>> {
        // Most lookups have no filter at all: one check, no call.
        if self.is_empty() {
            return instances.get(0);
        }
        self.pick_filtered(instances, turn)
    }

    fn pick_filtered<'i>(
        &self,
        instances: &'i Chunks,
        turn: &AtomicUsize,
    ) -> Option<&'i Arc<Instance>> {
        if !self.round_robin() {
            return instances.iter().find(|i| self.keeps(i));
        }
        if self.all().all(|f| matches!(f.0, Rule::RoundRobin)) {
            // Nothing to filter: the turn indexes the snapshot directly.
            if instances.is_empty() {
                return None;
            }
            return instances.get(next_turn(turn, instances.len()));
        }
        let matching = instances.iter().filter(|i| self.keeps(i)).count();
        if matching == 0 {
            return None;
        }
        let n = next_turn(turn, matching);
        instances.iter().filter(|i| self.keeps(i)).nth(n)
    }

    /// Every instance that matches (the shared snapshot itself when there is
    /// no filter); under round-robin, the one next in turn.
    pub(crate) fn select(&self, snapshot: &Arc<Chunks>, turn: &AtomicUsize) -> Instances {
        if self.is_empty() {
            return Instances(snapshot.clone());
        }
        if self.round_robin() {
            return self.pick(snapshot, turn).cloned().into_iter().collect();
        }
        snapshot.iter().filter(|i| self.keeps(i)).cloned().collect()
    }
}

/// An observe filter: decides whether an announcement enters the cache at all.
///
/// ```
/// use pubsub_registry::ObserveFilter;
/// let only_v2 = ObserveFilter::from_fn(|s| s.version.starts_with("2."));
/// # let _ = (only_v2, ObserveFilter::same_host());
/// ```
#[derive(Clone)]
pub struct ObserveFilter(ObserveRule);

#[derive(Clone)]
enum ObserveRule {
    SameHost,
    Custom(Arc<dyn Fn(&Service) -> bool + Send + Sync>),
}

impl ObserveFilter {
    /// Takes in only instances on the same host as this registry.
    pub fn same_host() -> Self {
        ObserveFilter(ObserveRule::SameHost)
    }

    /// Takes in only announcements for which `f` returns true.
    pub fn from_fn(f: impl Fn(&Service) -> bool + Send + Sync + 'static) -> Self {
        ObserveFilter(ObserveRule::Custom(Arc::new(f)))
    }

    pub(crate) fn accepts(&self, s: &Service, host: &str) -> bool {
        match &self.0 {
            ObserveRule::SameHost => s.host == host,
            ObserveRule::Custom(f) => f(s),
        }
    }
}

impl fmt::Debug for ObserveFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            ObserveRule::SameHost => "ObserveFilter::same_host",
            ObserveRule::Custom(_) => "ObserveFilter::from_fn",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_cycle_and_start_again_when_the_list_shrinks() {
        let turn = AtomicUsize::new(0);
        let taken: Vec<usize> = (0..7).map(|_| next_turn(&turn, 3)).collect();
        assert_eq!(taken, [0, 1, 2, 0, 1, 2, 0]);
        // At turn 1 of 3, the list drops to one instance: never past it.
        let taken: Vec<usize> = (0..3).map(|_| next_turn(&turn, 1)).collect();
        assert_eq!(taken, [0, 0, 0]);
        turn.store(usize::MAX, Ordering::Relaxed);
        assert_eq!(next_turn(&turn, 2), 0, "a turn past the end starts at 0");
    }
}

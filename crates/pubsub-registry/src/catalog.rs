//! The local cache of instances, by service name.
//!
//! Readers never lock: each name has an immutable snapshot behind an atomic
//! pointer, and the map of names is a lock-free concurrent map (papaya) that
//! only grows, so a new name costs one insertion whatever the number of
//! names (copying a snapshot of the map would cost them all). Writers (the
//! message handlers and the expiry timer) serialise on one mutex and publish
//! new snapshots. A heartbeat that changes nothing but the time only moves
//! the instance's due time, so it costs no snapshot at all.
//!
//! Each thread also remembers the snapshots it read last, with the name's
//! version when it read them. A repeated lookup then costs a hash, a string
//! compare and one plain atomic load of that version, and writes nothing
//! shared: no reference count, no hazard slot.
//!
//! Expiry counts from when this process received an announcement (never the
//! sender's clock). It is driven by a heap keyed by due time holding one entry
//! per instance: a heartbeat only moves the slot's due time, and the entry is
//! pushed back when it comes up early. The work is proportional to what comes
//! due, not to what is tracked. An entry takes 16 bytes: the time as a tick
//! of 8 bytes, the name's number and the instance's position in the name's
//! snapshot (an `Instant` and copies of the name and address took 56).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::due::DueHeap;
use crate::event::{Event, EventKind};
use crate::protocol::Announcement;
#[cfg(test)]
use crate::service::Status;
use crate::service::{unix_ms, Chunks, Instance, Service};

type Hasher = foldhash::fast::RandomState;
type NameMap = papaya::HashMap<Arc<str>, Arc<NameEntry>, Hasher>;

/// The instances of one name, as published.
pub(crate) type Snapshot = Arc<Chunks>;

/// Longest due time honoured, whatever an announcement claims.
const MAX_DUE: Duration = Duration::from_secs(24 * 3600);

/// With nothing to expire, the expiry timer still goes off this often: an
/// instance due later than that (the Go package's 20 s interval x 1.5
/// makes 30 s) is then already covered and needs no wake-up. A fresh
/// cache's first instance, typically a cold lookup's answer, would
/// otherwise wake the expiry task while the lookup waits for its own.
const IDLE_LOOK: Duration = Duration::from_secs(30);

/// What readers see of one name.
#[derive(Default)]
pub(crate) struct NameEntry {
    pub(crate) instances: ArcSwap<Chunks>,
    /// Bumped after each new snapshot is published (thread memos compare it).
    version: AtomicU64,
    /// Round-robin turn.
    pub(crate) turn: AtomicUsize,
    /// Woken whenever the snapshot changes (lookups waiting on a ping).
    pub(crate) changed: Notify,
}

pub(crate) struct Catalog {
    /// Tells this catalog's thread memos from another's.
    id: u64,
    /// Where its [`Tick`]s count from.
    epoch: Instant,
    names: NameMap,
    writer: Mutex<Writer>,
    /// Heap entries the expiry timer has examined.
    pub(crate) expiry_checks: AtomicU64,
    /// Woken when something comes due before the timer goes off.
    pub(crate) timer: Notify,
}

#[derive(Default)]
struct Writer {
    /// Each name's number: its place in `states` (names are never
    /// forgotten, so numbers are never reused).
    ids: HashMap<Arc<str>, u32, Hasher>,
    /// By number: heap entries name a name by it.
    states: Vec<NameState>,
    /// The number of the name looked up last: a burst, and most batches,
    /// are one name's announcements, and comparing the name costs less
    /// than hashing it.
    last: Option<u32>,
    heap: DueHeap<Tick, Due>,
    /// Instances tracked (slots in all names).
    live: usize,
    /// Numbers of the names changed since the last commit.
    dirty: Vec<u32>,
}

impl Writer {
    /// Drops an instance from its name's slots, its next snapshot and the
    /// count of instances.
    fn remove(&mut self, id: u32, address: &str) -> Option<Slot> {
        let state = &mut self.states[id as usize];
        let (slot, moved) = state.remove(id, &mut self.dirty, address)?;
        if let Some(scheduled) = moved {
            // The instance that took the hole is looked for there from now
            // on; its entry at the old position is no longer its own.
            let due = Due::new(id, slot.pos);
            // Never before the timer: the entry for its old position, due
            // at the same time, is still in the heap (or, during an expiry
            // round, the round arms the timer afterwards).
            self.heap.push(scheduled, due);
        }
        self.live -= 1;
        Some(slot)
    }

    /// The slot a heap entry points at, if that slot's entry comes up at
    /// `at`. Any slot found this way is one whose check is due at `at`,
    /// whichever entry brought it up.
    fn due_slot(&mut self, at: Tick, d: Due) -> Option<&mut Slot> {
        let state = self.states.get_mut(d.name as usize)?;
        let published;
        let snapshot = match &state.pending {
            Some(next) => next,
            None => {
                published = state.entry.instances.load();
                &**published
            }
        };
        let instance = snapshot.get(d.pos as usize)?;
        let slot = state.slots.get_mut(instance.address())?;
        (slot.scheduled == at).then_some(slot)
    }

    /// Drops the heap entries of instances removed since (and entries an
    /// earlier one replaced) once they outnumber the live instances:
    /// announcements and unregisters of ever new addresses, or of ever
    /// shorter intervals, must not grow the heap until their entries come
    /// due (a day, for an interval that claims it).
    fn forget_stale_dues(&mut self) {
        if !self.heap.needs_compacting(self.live) {
            return;
        }
        let mut heap = std::mem::take(&mut self.heap);
        heap.compact(|at, d| self.due_slot(at, *d).is_some());
        self.heap = heap;
    }
}

struct NameState {
    name: Arc<str>,
    entry: Arc<NameEntry>,
    slots: Slots,
    /// The next snapshot, while a batch changes it.
    pending: Option<Chunks>,
}

/// What every change of a batch shares.
struct Batch {
    /// When it was received, by both clocks.
    at: Tick,
    wall_ms: u64,
    /// Due-time factor: how many intervals an instance lives unheard.
    factor: f64,
    /// The last interval and how long it lets an instance live: a batch's
    /// announcements nearly all carry one interval, and `mul_f64` is a
    /// noticeable part of a message's cost.
    lives: Cell<(Duration, Duration)>,
}

impl Batch {
    /// How long an announcement of `interval` lives unheard.
    fn lives(&self, interval: Duration) -> Duration {
        let (last, lives) = self.lives.get();
        if last == interval {
            return lives;
        }
        let lives = interval.min(MAX_DUE).mul_f64(self.factor).min(MAX_DUE);
        self.lives.set((interval, lives));
        lives
    }
}

/// A change to apply, decoded from the wire into its place in a batch
/// ([`Change::push`]): an announcement weighs some 200 bytes, and each move
/// of one is a `memcpy`.
#[derive(Default)]
pub(crate) struct Change {
    pub(crate) what: Announcement,
    pub(crate) kind: ChangeKind,
}

#[derive(Clone, Copy, Default)]
pub(crate) enum ChangeKind {
    /// Keep the instance for this interval (x the due factor).
    Announce { interval: Duration },
    /// Drop it.
    #[default]
    Remove,
}

impl Change {
    /// Adds an empty change to `batch`, to be filled in place.
    pub(crate) fn push(batch: &mut Vec<Change>) -> &mut Change {
        batch.push(Change::default());
        let last = batch.len() - 1;
        &mut batch[last]
    }

    #[cfg(test)]
    fn announce(service: Service, status: Status, interval: Duration, sent_ms: u64) -> Self {
        Change {
            what: Announcement {
                service,
                status,
                registered_ms: (sent_ms > 0).then_some(sent_ms as i64),
                duration_ms: None,
            },
            kind: ChangeKind::Announce { interval },
        }
    }

    #[cfg(test)]
    fn remove(name: &str, address: &str) -> Self {
        Change {
            what: Announcement {
                service: Service::new(name, address),
                ..Announcement::default()
            },
            kind: ChangeKind::Remove,
        }
    }
}

/// A name's slots by address. The address is the instance's own, not kept
/// again as a key: 24 bytes less an instance, and one hash of it per
/// announcement. Each slot keeps 32 bits of its address's hash instead, so
/// that growing the table rehashes from the slot rather than fetching each
/// instance and hashing its address again (a burst of a new name's
/// instances grows it ten times).
#[derive(Default)]
struct Slots {
    table: hashbrown::HashTable<Slot>,
    hasher: Hasher,
}

/// The table's hash of a slot from the 32 bits it keeps: the multiply
/// spreads them over the high bits, which the table's probes compare.
fn spread(key: u32) -> u64 {
    u64::from(key).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl Slots {
    /// The 32 bits of `address`'s hash that its slot keeps.
    fn key(&self, address: &str) -> u32 {
        self.hasher.hash_one(address) as u32
    }

    fn hash(&self, address: &str) -> u64 {
        spread(self.key(address))
    }

    fn find_mut(&mut self, hash: u64, address: &str) -> Option<&mut Slot> {
        self.table.find_mut(hash, Self::matching(address))
    }

    fn matching(address: &str) -> impl Fn(&Slot) -> bool + '_ {
        move |s| s.instance.address() == address
    }

    fn get_mut(&mut self, address: &str) -> Option<&mut Slot> {
        self.find_mut(self.hash(address), address)
    }

    /// Adds the slot of an address not in the table.
    fn insert_new(&mut self, slot: Slot) {
        self.table
            .insert_unique(spread(slot.key), slot, |s| spread(s.key));
    }

    fn remove(&mut self, address: &str) -> Option<Slot> {
        let entry = self
            .table
            .find_entry(self.hash(address), Self::matching(address))
            .ok()?;
        Some(entry.remove().0)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.table.iter()
    }
}

struct Slot {
    instance: Arc<Instance>,
    /// Its position in the name's snapshot.
    pos: u32,
    /// Its address's hash, as [`Slots::key`] gives it.
    key: u32,
    /// When it expires unless heard from again.
    due: Tick,
    /// When its heap entry comes up (never later than `due`).
    scheduled: Tick,
}

/// A point in time as nanoseconds since the catalog was made: 8 bytes
/// where an `Instant` takes 16, twice in every slot and once in every heap
/// entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Tick(u64);

impl Tick {
    fn after(self, d: Duration) -> Tick {
        Tick(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

/// What an expiry heap entry is for: the instance at `pos` in the snapshot
/// of name number `name`. Positions move when an instance is removed (the
/// last one takes the hole), so every slot has an entry for its current
/// position and its scheduled time; an entry whose position now holds a
/// slot scheduled for another time is stale and skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    name: u32,
    pos: u32,
}

impl Due {
    fn new(name: u32, pos: u32) -> Self {
        Due { name, pos }
    }
}

impl Catalog {
    pub(crate) fn new() -> Self {
        static IDS: AtomicU64 = AtomicU64::new(1);
        Catalog {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            epoch: Instant::now(),
            names: NameMap::default(),
            writer: Mutex::new(Writer::default()),
            expiry_checks: AtomicU64::new(0),
            timer: Notify::new(),
        }
    }

    /// Runs `f` on a name's snapshot and round-robin turn, if the cache
    /// knows the name. Lock-free and allocation-free; from this thread's
    /// memo when the name has not changed since this thread last read it.
    #[inline]
    pub(crate) fn read<R>(
        &self,
        name: &str,
        f: impl FnOnce(&Snapshot, &AtomicUsize) -> R,
    ) -> Option<R> {
        let slot = memo_slot(name);
        let mut f = Some(f);
        let hit = MEMO.try_with(|m| {
            let m = m.try_borrow().ok()?;
            let memo = m[slot].as_ref()?;
            let fresh = memo.catalog == self.id
                && same_name(&memo.name, name)
                && memo.entry.version.load(Ordering::Acquire) == memo.version;
            // Run `f` under the borrow: cloning the snapshot out would move
            // a reference count shared by every thread.
            if !fresh {
                return None;
            }
            let f = f.take()?;
            Some(f(&memo.instances, &memo.entry.turn))
        });
        match (hit, f) {
            (Ok(Some(r)), _) => Some(r),
            (_, Some(f)) => self.read_and_remember(name, slot, f),
            (_, None) => None,
        }
    }

    #[cold]
    fn read_and_remember<R>(
        &self,
        name: &str,
        slot: usize,
        f: impl FnOnce(&Snapshot, &AtomicUsize) -> R,
    ) -> Option<R> {
        let names = self.names.pin();
        let (key, entry) = names.get_key_value(name)?;
        // The version first: if a commit lands in between, the memo is
        // older than the snapshot it holds and is simply refreshed next time.
        let version = entry.version.load(Ordering::Acquire);
        let instances = entry.instances.load_full();
        let r = f(&instances, &entry.turn);
        // Skipped when `f` itself looked something up (a filter that calls
        // the registry) and holds the memo, or during thread teardown.
        let _ = MEMO.try_with(|m| {
            if let Ok(mut m) = m.try_borrow_mut() {
                m[slot] = Some(Memo {
                    catalog: self.id,
                    version,
                    name: key.clone(),
                    entry: entry.clone(),
                    instances,
                });
            }
        });
        Some(r)
    }

    /// The entry of a name, created empty if needed (for lookups that wait).
    pub(crate) fn ensure(&self, name: &str) -> Arc<NameEntry> {
        if let Some(e) = self.names.pin().get(name) {
            return e.clone();
        }
        let mut w = self.lock();
        let id = self.id(&mut w, name);
        w.states[id as usize].entry.clone()
    }

    /// Names with at least one instance, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .names
            .pin()
            .iter()
            .filter(|(_, e)| !e.instances.load().is_empty())
            .map(|(n, _)| n.to_string())
            .collect();
        names.sort();
        names
    }

    /// Every instance of every name.
    pub(crate) fn all(&self) -> Vec<Arc<Instance>> {
        let names = self.names.pin();
        let mut all = Vec::new();
        for e in names.values() {
            all.extend(e.instances.load().iter().cloned());
        }
        all
    }

    /// Applies changes received now under one lock, publishing each touched
    /// name's snapshot once: a burst costs one copy per name, not one per
    /// message. Empties `changes`, and adds the events raised to `events`,
    /// in order.
    pub(crate) fn apply(&self, changes: &mut Vec<Change>, factor: f64, events: &mut Vec<Event>) {
        let mut guard = self.lock();
        let w = &mut *guard;
        events.reserve(changes.len());
        // Read once: a batch is taken in at one time (clock reads are a
        // noticeable part of a message's cost on a VM).
        let batch = Batch {
            at: self.tick(Instant::now()),
            wall_ms: unix_ms(SystemTime::now()),
            factor,
            // Zero lives for zero whatever the factor.
            lives: Cell::new((Duration::ZERO, Duration::ZERO)),
        };
        for change in changes.iter_mut() {
            let event = match change.kind {
                ChangeKind::Announce { interval } => {
                    self.announce_in(w, &mut change.what, interval, &batch)
                }
                ChangeKind::Remove => {
                    let s = &change.what.service;
                    Self::remove_in(w, &s.name, &s.address)
                }
            };
            events.extend(event);
        }
        self.commit(w);
        drop(guard);
        changes.clear();
    }

    /// Takes in one announcement received now; returns the event it raises.
    #[cfg(test)]
    pub(crate) fn announce(
        &self,
        service: Service,
        status: Status,
        interval: Duration,
        factor: f64,
        sent: Option<SystemTime>,
    ) -> Option<Event> {
        let change = Change::announce(service, status, interval, sent.map_or(0, unix_ms));
        self.apply_one(change, factor)
    }

    /// Drops one instance at once; returns the `Unregistered` event.
    #[cfg(test)]
    pub(crate) fn remove(&self, name: &str, address: &str) -> Option<Event> {
        self.apply_one(Change::remove(name, address), 1.0)
    }

    #[cfg(test)]
    fn apply_one(&self, change: Change, factor: f64) -> Option<Event> {
        let mut events = Vec::new();
        self.apply(&mut vec![change], factor, &mut events);
        events.pop()
    }

    /// Takes in an announcement received now. Its service is moved out
    /// when it makes a new instance.
    fn announce_in(
        &self,
        w: &mut Writer,
        announced: &mut Announcement,
        interval: Duration,
        batch: &Batch,
    ) -> Option<Event> {
        let (status, sent_ms) = (announced.status, announced.sent_ms());
        let service = &mut announced.service;
        let due = batch.at.after(batch.lives(interval));
        let id = self.id(w, &service.name);
        let state = &mut w.states[id as usize];
        let fresh = |service: &mut Service| {
            Arc::new(Instance::new(
                std::mem::take(service),
                status,
                interval,
                sent_ms,
                batch.wall_ms,
            ))
        };
        let key = state.slots.key(&service.address);
        let (event, push) = match state.slots.find_mut(spread(key), &service.address) {
            Some(slot) => {
                slot.due = due;
                // Only an interval that shrank needs an earlier heap entry.
                let push = (due < slot.scheduled).then(|| {
                    slot.scheduled = due;
                    Due::new(id, slot.pos)
                });
                if slot.instance.same_as(service, status) {
                    slot.instance.touch(sent_ms, batch.wall_ms);
                    (None, push)
                } else {
                    let previous = slot.instance.status;
                    let instance = fresh(service);
                    slot.instance = instance.clone();
                    let (pos, replaced) = (slot.pos as usize, instance.clone());
                    state.change(id, &mut w.dirty, move |v| v.set(pos, replaced));
                    let kind = if previous == status {
                        EventKind::Registered
                    } else {
                        EventKind::StatusChanged { previous }
                    };
                    (Some(Event { kind, instance }), push)
                }
            }
            None => {
                let instance = fresh(service);
                let added = instance.clone();
                let pos = state.change(id, &mut w.dirty, move |v| v.push(added));
                // A name cannot hold 2^32 instances: they would take 2 TiB.
                let pos = u32::try_from(pos).expect("fewer than 2^32 instances in a name");
                w.live += 1;
                state.slots.insert_new(Slot {
                    instance: instance.clone(),
                    pos,
                    key,
                    due,
                    scheduled: due,
                });
                let push = Due::new(id, pos);
                let event = Event {
                    kind: EventKind::Registered,
                    instance,
                };
                (Some(event), Some(push))
            }
        };
        if let Some(d) = push {
            if w.heap.push(due, d) {
                self.timer.notify_one();
            }
            w.forget_stale_dues();
        }
        event
    }

    fn remove_in(w: &mut Writer, name: &str, address: &str) -> Option<Event> {
        let id = *w.ids.get(name)?;
        let slot = w.remove(id, address)?;
        w.forget_stale_dues();
        Some(Event {
            kind: EventKind::Unregistered,
            instance: slot.instance,
        })
    }

    /// Publishes the snapshots a batch changed, and wakes their waiters.
    fn commit(&self, w: &mut Writer) {
        for id in w.dirty.drain(..) {
            let state = &mut w.states[id as usize];
            if let Some(v) = state.pending.take() {
                state.entry.instances.store(Arc::new(v));
                state.entry.version.fetch_add(1, Ordering::Release);
                state.entry.changed.notify_waiters();
            }
        }
    }

    /// Drops every instance due by `now`; returns their `Expired` events and
    /// when to look again.
    pub(crate) fn expire(&self, now: Instant) -> (Vec<Event>, Instant) {
        let now = self.tick(now);
        let mut guard = self.lock();
        let w = &mut *guard;
        let mut events = Vec::new();
        while let Some((at, d)) = w.heap.pop_due(now) {
            self.expiry_checks.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = w.due_slot(at, d) else {
                continue; // removed or moved since, or a stale extra entry
            };
            if slot.due > now {
                slot.scheduled = slot.due;
                let due = slot.due;
                w.heap.push(due, d);
                continue;
            }
            let address = slot.instance.service.address.clone();
            if let Some(slot) = w.remove(d.name, &address) {
                events.push(Event {
                    kind: EventKind::Expired,
                    instance: slot.instance,
                });
            }
        }
        self.commit(w);
        let idle = now.after(IDLE_LOOK);
        let next = w.heap.arm(Some(idle)).unwrap_or(idle);
        (events, self.instant(next))
    }

    /// Number of instances tracked.
    pub(crate) fn len(&self) -> usize {
        self.lock().live
    }

    /// The number of a name's state, made empty (and visible to readers)
    /// on first use.
    fn id(&self, w: &mut Writer, name: &str) -> u32 {
        if let Some(last) = w.last.filter(|&id| *w.states[id as usize].name == *name) {
            return last;
        }
        let id = match w.ids.get(name) {
            Some(&id) => id,
            None => self.new_name(w, name),
        };
        w.last = Some(id);
        id
    }

    fn new_name(&self, w: &mut Writer, name: &str) -> u32 {
        let name: Arc<str> = name.into();
        let entry = Arc::new(NameEntry::default());
        self.names.pin().insert(name.clone(), entry.clone());
        let id = u32::try_from(w.states.len()).expect("fewer than 2^32 names");
        w.ids.insert(name.clone(), id);
        w.states.push(NameState {
            name,
            entry,
            slots: Slots::default(),
            pending: None,
        });
        id
    }

    fn tick(&self, at: Instant) -> Tick {
        Tick(0).after(at.saturating_duration_since(self.epoch))
    }

    fn instant(&self, t: Tick) -> Instant {
        self.epoch + Duration::from_nanos(t.0)
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // Snapshots are published whole, so a lock poisoned by a panicking
        // user callback still guards a consistent state.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One remembered read: a name's snapshot and the version it was read at.
struct Memo {
    catalog: u64,
    version: u64,
    name: Arc<str>,
    entry: Arc<NameEntry>,
    instances: Snapshot,
}

/// Memo slots per thread; a name always uses the slot its hash picks.
const MEMO_SLOTS: usize = 16;

thread_local! {
    static MEMO: RefCell<[Option<Memo>; MEMO_SLOTS]> = const { RefCell::new([const { None }; MEMO_SLOTS]) };
}

/// `a == b`, without a call to `memcmp` for names of up to 16 bytes (most
/// of them): that call was about 3 ns of a 25 ns cached lookup.
#[inline]
fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    // Two loads from each end, overlapping when shorter than two words.
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap());
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap());
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => a == b,
    }
}

#[inline]
fn memo_slot(name: &str) -> usize {
    foldhash::fast::FixedState::default().hash_one(name) as usize % MEMO_SLOTS
}

impl NameState {
    /// Changes the next snapshot, starting it from the current one on the
    /// first change of a batch (a copy of the list of chunks, which share
    /// their instances until changed).
    fn change<R>(
        &mut self,
        id: u32,
        dirty: &mut Vec<u32>,
        change: impl FnOnce(&mut Chunks) -> R,
    ) -> R {
        let pending = match &mut self.pending {
            Some(v) => v,
            None => {
                dirty.push(id);
                self.pending
                    .insert(Chunks::clone(&self.entry.instances.load()))
            }
        };
        change(pending)
    }

    /// Drops an instance from the slots and the next snapshot. The last
    /// instance of the snapshot takes its place: its slot learns the move,
    /// and its scheduled check is returned, to be found at the new place.
    fn remove(
        &mut self,
        id: u32,
        dirty: &mut Vec<u32>,
        address: &str,
    ) -> Option<(Slot, Option<Tick>)> {
        let slot = self.slots.remove(address)?;
        let pos = slot.pos;
        let mut moved_check = None;
        if let Some(moved) = self.change(id, dirty, |v| v.swap_remove(pos as usize)) {
            if let Some(s) = self.slots.get_mut(moved.address()) {
                s.pos = pos;
                moved_check = Some(s.scheduled);
            }
        }
        Some((slot, moved_check))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, addr: &str) -> Service {
        Service::new(name, addr)
    }

    #[test]
    fn same_name_is_string_equality() {
        for n in 0..=40 {
            let a: String = (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            assert!(same_name(&a, &a.clone()), "{a:?} differs from itself");
            for i in 0..n {
                let mut b = a.clone().into_bytes();
                b[i] = b'#';
                let b = String::from_utf8(b).unwrap();
                assert!(!same_name(&a, &b), "{a:?} same as {b:?}");
            }
            let longer = format!("{a}a");
            assert!(!same_name(&a, &longer) && !same_name(&longer, &a));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn announce_refresh_change_remove() {
        let c = Catalog::new();
        let ev = c.announce(
            svc("a", "h:1"),
            Status::Passing,
            Duration::from_secs(1),
            1.5,
            None,
        );
        assert_eq!(ev.unwrap().kind, EventKind::Registered);
        // Same content: a refresh, no event, same shared instance.
        let before = c.read("a", |v, _| v[0].clone()).unwrap();
        assert!(c
            .announce(
                svc("a", "h:1"),
                Status::Passing,
                Duration::from_secs(1),
                1.5,
                None
            )
            .is_none());
        let after = c.read("a", |v, _| v[0].clone()).unwrap();
        assert!(Arc::ptr_eq(&before, &after));
        let ev = c.announce(
            svc("a", "h:1"),
            Status::Warning,
            Duration::from_secs(1),
            1.5,
            None,
        );
        assert_eq!(
            ev.unwrap().kind,
            EventKind::StatusChanged {
                previous: Status::Passing
            }
        );
        assert_eq!(c.read("a", |v, _| v[0].status), Some(Status::Warning));
        assert_eq!(c.remove("a", "h:1").unwrap().kind, EventKind::Unregistered);
        assert!(c.remove("a", "h:1").is_none());
        assert_eq!(c.read("a", |v, _| v.len()), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_thread_memo_never_answers_with_a_stale_snapshot() {
        let (one, two) = (Catalog::new(), Catalog::new());
        let interval = Duration::from_secs(1);
        one.announce(svc("a", "h:1"), Status::Passing, interval, 1.5, None);
        two.announce(svc("a", "h:2"), Status::Passing, interval, 1.5, None);
        let addresses = |c: &Catalog| {
            c.read("a", |v, _| {
                v.iter()
                    .map(|i| i.address().to_string())
                    .collect::<Vec<_>>()
            })
        };
        // Same name, same thread, same memo slot: each catalog its own answer.
        for _ in 0..2 {
            assert_eq!(addresses(&one).unwrap(), ["h:1"]);
            assert_eq!(addresses(&two).unwrap(), ["h:2"]);
        }
        // A change after the memo was taken is seen at the next read.
        assert_eq!(addresses(&one).unwrap(), ["h:1"]);
        one.announce(svc("a", "h:3"), Status::Passing, interval, 1.5, None);
        assert_eq!(addresses(&one).unwrap(), ["h:1", "h:3"]);
        one.remove("a", "h:1");
        assert_eq!(addresses(&one).unwrap(), ["h:3"]);
        one.announce(svc("a", "h:3"), Status::Critical, interval, 1.5, None);
        assert_eq!(one.read("a", |v, _| v[0].status), Some(Status::Critical));
        // Another thread's reads do not disturb this one's.
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(addresses(&one).unwrap(), ["h:3"]));
        });
        tokio::time::advance(Duration::from_secs(2)).await;
        one.expire(Instant::now());
        assert_eq!(addresses(&one).unwrap(), Vec::<String>::new());
        assert!(one.read("b", |_, _| ()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn every_name_of_a_batch_is_readable_after_it() {
        let c = Catalog::new();
        let interval = Duration::from_secs(1);
        let mut changes: Vec<_> = (0..5000)
            .map(|i| Change::announce(svc(&format!("n{i}"), "h:1"), Status::Passing, interval, 0))
            .collect();
        let mut events = Vec::new();
        c.apply(&mut changes, 1.5, &mut events);
        assert_eq!(events.len(), 5000);
        assert_eq!(c.names().len(), 5000);
        for i in (0..5000).step_by(7) {
            let addresses = c.read(&format!("n{i}"), |v, _| v.len());
            assert_eq!(addresses, Some(1), "n{i}");
        }
        assert!(c.read("n5000", |_, _| ()).is_none());
        // A name a lookup waits on is readable (empty) before any instance.
        c.ensure("later");
        assert_eq!(c.read("later", |v, _| v.len()), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_follows_the_last_refresh() {
        let c = Catalog::new();
        let interval = Duration::from_millis(100);
        c.announce(svc("a", "h:1"), Status::Passing, interval, 1.5, None);
        c.announce(svc("a", "h:2"), Status::Passing, interval, 1.5, None);
        tokio::time::advance(Duration::from_millis(100)).await;
        c.announce(svc("a", "h:2"), Status::Passing, interval, 1.5, None);
        let (events, next) = c.expire(Instant::now());
        assert!(events.is_empty());
        assert_eq!(next - Instant::now(), Duration::from_millis(50));
        tokio::time::advance(Duration::from_millis(51)).await;
        let (events, _) = c.expire(Instant::now());
        assert_eq!(events.len(), 1, "h:1 is due at 150 ms");
        assert_eq!(events[0].instance.address(), "h:1");
        tokio::time::advance(Duration::from_millis(99)).await;
        let (events, _) = c.expire(Instant::now());
        assert_eq!(events[0].instance.address(), "h:2", "h:2 is due at 250 ms");
        assert_eq!(c.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn only_an_instance_due_before_the_timer_goes_off_wakes_it() {
        use futures_util::FutureExt;
        let woken = |c: &Catalog| c.timer.notified().now_or_never().is_some();
        let c = Catalog::new();
        let (_, next) = c.expire(Instant::now());
        assert_eq!(next - Instant::now(), IDLE_LOOK);
        // The Go package's interval: due when the idle timer goes off anyway.
        let go = Duration::from_secs(20);
        c.announce(svc("a", "h:1"), Status::Passing, go, 1.5, None);
        assert!(!woken(&c), "due no earlier than the timer");
        c.announce(
            svc("a", "h:2"),
            Status::Passing,
            Duration::from_secs(1),
            1.5,
            None,
        );
        assert!(woken(&c), "due before the timer");
        c.announce(
            svc("a", "h:3"),
            Status::Passing,
            Duration::from_secs(2),
            1.5,
            None,
        );
        assert!(!woken(&c), "the timer is now for h:2, earlier");
        // Before the expiry task first looks, any due time wakes it.
        let fresh = Catalog::new();
        fresh.announce(svc("a", "h:1"), Status::Passing, go, 1.5, None);
        assert!(woken(&fresh));
    }

    fn announce_many(c: &Catalog, name: &str, addresses: impl Iterator<Item = String>) {
        let mut changes: Vec<_> = addresses
            .map(|a| Change::announce(svc(name, &a), Status::Passing, Duration::from_secs(1), 0))
            .collect();
        c.apply(&mut changes, 1.5, &mut Vec::new());
    }

    fn snapshot(c: &Catalog, name: &str) -> Snapshot {
        c.names.pin().get(name).unwrap().instances.load_full()
    }

    /// Chunks of `b` that are not shared with `a`.
    fn copied(a: &Snapshot, b: &Snapshot) -> usize {
        b.chunks()
            .iter()
            .enumerate()
            .filter(|(i, chunk)| {
                a.chunks()
                    .get(*i)
                    .is_none_or(|old| !Arc::ptr_eq(old, chunk))
            })
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_copies_one_chunk_not_the_name() {
        let c = Catalog::new();
        announce_many(&c, "big", (0..1000).map(|i| format!("h:{i}")));
        let before = snapshot(&c, "big");
        assert_eq!(before.len(), 1000);
        assert!(before.chunks().len() > 10);

        let ev = c.announce(
            svc("big", "h:500"),
            Status::Warning,
            Duration::from_secs(1),
            1.5,
            None,
        );
        assert!(ev.is_some());
        let changed = snapshot(&c, "big");
        assert_eq!(copied(&before, &changed), 1, "one chunk copied");
        assert_eq!(changed[500].status, Status::Warning);

        // A removal moves the last instance into the hole: two chunks.
        c.remove("big", "h:10").unwrap();
        let removed = snapshot(&c, "big");
        assert_eq!(removed.len(), 999);
        assert_eq!(copied(&changed, &removed), 2);
        assert_eq!(removed[10].address(), "h:999");
        assert!(removed.iter().all(|i| i.address() != "h:10"));

        // A refresh publishes nothing.
        c.announce(
            svc("big", "h:1"),
            Status::Passing,
            Duration::from_secs(1),
            1.5,
            None,
        );
        assert!(Arc::ptr_eq(&removed, &snapshot(&c, "big")));
    }

    /// Every slot's position names its own instance, and the snapshot holds
    /// exactly the slots' instances.
    fn check_positions(c: &Catalog, name: &str) -> Vec<(String, Status)> {
        let w = c.lock();
        let state = &w.states[w.ids[name] as usize];
        let published = state.entry.instances.load();
        assert_eq!(published.len(), state.slots.len());
        for slot in state.slots.iter() {
            assert!(
                Arc::ptr_eq(&published[slot.pos as usize], &slot.instance),
                "{}",
                slot.instance.address()
            );
        }
        let mut all: Vec<_> = published
            .iter()
            .map(|i| (i.address().to_string(), i.status))
            .collect();
        all.sort();
        all
    }

    /// A repeatable pseudo-random sequence: `random(n)` is below `n`.
    fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_snapshot_follows_any_sequence_of_changes() {
        let c = Catalog::new();
        let mut model: HashMap<String, Status> = HashMap::new();
        let mut random = xorshift(0x2545_f491_4f6c_dd1d_u64);
        let statuses = [Status::Passing, Status::Warning, Status::Critical];
        for round in 0..300 {
            let mut changes = Vec::new();
            for _ in 0..=random(40) {
                let address = format!("h:{}", random(200));
                if random(3) == 0 {
                    model.remove(&address);
                    changes.push(Change::remove("n", &address));
                } else {
                    let status = statuses[random(3) as usize];
                    model.insert(address.clone(), status);
                    changes.push(Change::announce(
                        svc("n", &address),
                        status,
                        Duration::from_secs(1),
                        0,
                    ));
                }
            }
            c.apply(&mut changes, 1.5, &mut Vec::new());
            let mut expected: Vec<_> = model.iter().map(|(a, s)| (a.clone(), *s)).collect();
            expected.sort();
            assert_eq!(check_positions(&c, "n"), expected, "round {round}");
        }
        // Expiry removes through the same path.
        tokio::time::advance(Duration::from_secs(2)).await;
        let (events, _) = c.expire(Instant::now());
        assert_eq!(events.len(), model.len());
        assert!(check_positions(&c, "n").is_empty());
    }

    /// Heap entries name positions, which move on every removal: whatever
    /// the sequence of announcements (of any interval), unregisters and
    /// expiries, each instance expires exactly when it is due.
    #[tokio::test(start_paused = true)]
    async fn expiry_follows_any_sequence_of_changes() {
        let c = Catalog::new();
        let mut model: HashMap<(String, String), Instant> = HashMap::new();
        let mut random = xorshift(0x9e37_79b9_7f4a_7c15_u64);
        let intervals = [100, 200, 500, 1000, 3000].map(Duration::from_millis);
        let mut expired_total = 0;
        for round in 0..400 {
            let now = Instant::now();
            let mut changes = Vec::new();
            for _ in 0..=random(30) {
                let name = ["n", "m"][random(2) as usize];
                let address = format!("h:{}", random(120));
                let key = (name.to_string(), address.clone());
                if random(4) == 0 {
                    model.remove(&key);
                    changes.push(Change::remove(name, &address));
                } else {
                    let interval = intervals[random(5) as usize];
                    model.insert(key, now + interval.mul_f64(1.5));
                    changes.push(Change::announce(
                        svc(name, &address),
                        Status::Passing,
                        interval,
                        0,
                    ));
                }
            }
            c.apply(&mut changes, 1.5, &mut Vec::new());
            tokio::time::advance(Duration::from_millis(random(400))).await;
            let now = Instant::now();
            let mut expected: Vec<_> = model
                .iter()
                .filter(|(_, due)| **due <= now)
                .map(|(k, _)| k.clone())
                .collect();
            expected.sort();
            model.retain(|_, due| *due > now);
            let mut got: Vec<_> = c
                .expire(now)
                .0
                .iter()
                .map(|e| {
                    (
                        e.instance.name().to_string(),
                        e.instance.address().to_string(),
                    )
                })
                .collect();
            got.sort();
            assert_eq!(got, expected, "round {round}");
            expired_total += got.len();
            assert_eq!(c.len(), model.len(), "round {round}");
            for name in ["n", "m"] {
                check_positions(&c, name);
            }
            let w = c.lock();
            assert!(w.heap.len() <= 2 * w.live + 1024 + 31, "round {round}");
        }
        assert!(
            expired_total > 1000,
            "the sequence expires many: {expired_total}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn churn_does_not_grow_the_expiry_heap() {
        let c = Catalog::new();
        let hour = Duration::from_secs(3600);
        c.announce(svc("n", "kept:1"), Status::Passing, hour, 1.5, None);
        // New addresses, each gone at once; then one address announcing
        // ever shorter intervals (each pushes an earlier entry).
        for i in 0..5000 {
            let address = format!("h:{i}");
            c.announce(svc("n", &address), Status::Passing, hour, 1.5, None);
            c.remove("n", &address).unwrap();
        }
        for i in 0..5000 {
            let interval = hour - Duration::from_millis(i);
            c.announce(
                svc("n", "shrinking:1"),
                Status::Passing,
                interval,
                1.5,
                None,
            );
        }
        let (live, entries) = {
            let w = c.lock();
            (w.live, w.heap.len())
        };
        assert_eq!(live, 2);
        assert!(entries <= 2 * live + 1024 + 1, "{entries} entries");
        // What is left still expires both.
        tokio::time::advance(hour * 2).await;
        assert_eq!(c.expire(Instant::now()).0.len(), 2);
        assert_eq!(c.len(), 0);
    }
}

//! From a spec to a task graph: every stage becomes an operator with its output schema and
//! parallelism; operators joined by a forward exchange at equal parallelism are chained into one
//! vertex; a vertex runs as `parallelism` tasks, and edges between vertices say how rows are routed.
//!
//! Both the coordinator (to validate and schedule) and every worker (to build its tasks) plan the same
//! spec text, so the plan is a pure function of it.

use std::collections::HashMap;
use std::fmt;

use sqlparser::ast::{self, FunctionArg, FunctionArgExpr, FunctionArguments};

use crate::connectors::{self, PostgresLookupOptions, SinkConnector, SourceConnector};
use crate::expr::{parse_select_list, Expr};
use crate::spec::{JobSpec, LookupSpec, SinkSpec, TransformSpec, WindowSpec};
use crate::time::parse_duration_ms;
use crate::{DataType, Field, Schema, SpecError};

/// Default number of key groups.
pub const DEFAULT_MAX_PARALLELISM: u32 = 128;

/// A planned job.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The job's name.
    pub name: String,
    /// Number of key groups.
    pub max_parallelism: u32,
    /// Operators in topological order.
    pub operators: Vec<Operator>,
    /// Chains of operators; each runs as `parallelism` tasks.
    pub vertices: Vec<Vertex>,
    /// Exchanges between vertices.
    pub edges: Vec<Edge>,
    /// State backend and checkpointing.
    pub state: StatePlan,
}

impl Plan {
    /// A digest of everything the plan says (FNV-1a over its description), equal on every process
    /// that plans the same spec with the same version of Eddy: the coordinator sends it with a
    /// deployment, and a worker whose own plan differs refuses to run it.
    pub fn fingerprint(&self) -> u64 {
        format!("{self:?}").bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }
}

/// Where keyed state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateBackend {
    /// RocksDB on the worker's disk, snapshotted incrementally (the default).
    RocksDb,
    /// The heap; snapshots write every entry.
    Memory,
}

/// State settings of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatePlan {
    /// Backend of keyed operator state.
    pub backend: StateBackend,
    /// Time between checkpoints; `None` when checkpoints are off.
    pub checkpoint_interval_ms: Option<u64>,
}

/// Checkpoint interval when the spec sets none.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 5_000;

impl StatePlan {
    fn from_spec(spec: &crate::spec::StateSpec) -> Result<StatePlan, SpecError> {
        let backend = match spec.backend.as_deref().unwrap_or("rocksdb") {
            "rocksdb" => StateBackend::RocksDb,
            "memory" => StateBackend::Memory,
            other => return Err(SpecError::new("state.backend", format!("unknown backend `{other}`; use \"rocksdb\" or \"memory\""))),
        };
        let checkpoint_interval_ms = match &spec.checkpoint_interval {
            None => Some(DEFAULT_CHECKPOINT_INTERVAL_MS),
            Some(text) => match crate::time::parse_duration_ms(text) {
                Ok(0) => None,
                Ok(ms) if ms >= 100 => Some(ms as u64),
                Ok(_) => return Err(SpecError::new("state.checkpoint_interval", "must be 0s (off) or at least 100ms")),
                Err(e) => return Err(SpecError::new("state.checkpoint_interval", e)),
            },
        };
        Ok(StatePlan { backend, checkpoint_interval_ms })
    }
}

/// One stage of the spec, checked.
#[derive(Debug, Clone)]
pub struct Operator {
    /// The stage's name.
    pub name: String,
    /// What it does.
    pub kind: OperatorKind,
    /// Parallel instances.
    pub parallelism: u32,
    /// Schema of its main output.
    pub schema: Schema,
}

/// What an operator does.
#[derive(Debug, Clone)]
pub enum OperatorKind {
    /// Reads an external system or generates rows.
    Source {
        /// The connector.
        connector: SourceConnector,
        /// Event-time settings, if the source has them.
        event_time: Option<EventTime>,
    },
    /// Filters, then projects.
    Transform {
        /// Rows where this is not TRUE are dropped.
        filter: Option<Expr>,
        /// Output columns; `None` keeps the input row.
        projection: Option<Vec<Expr>>,
        /// What happens to a row the expressions fail on.
        bad_records: connectors::BadRecordPolicy,
        /// Where `bad_records = "dead-letter"` puts such rows.
        dead_letter_path: Option<String>,
    },
    /// Keyed event-time window aggregation.
    Window(WindowPlan),
    /// LEFT lookup join: appends the external row whose key equals input column `on`.
    Lookup {
        /// The external table.
        options: PostgresLookupOptions,
        /// Input column compared with the external key.
        on: usize,
        /// The looked-up columns (appended, nullable).
        columns: Schema,
        /// Set when the input is a changelog with a key (an upsert or CDC source upstream): the
        /// lookup then remembers what it joined to each key's row, so that the row's retraction
        /// carries the dimension values its insert got, not the table's current ones.
        remember: Option<LookupMemory>,
    },
    /// Writes rows out.
    Sink {
        /// The connector.
        connector: SinkConnector,
    },
}

/// What a lookup over a changelog remembers per row key, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct LookupMemory {
    /// Input columns of the changelog's key (the source's primary key).
    pub key: Vec<usize>,
    /// Input column of the event time the time to live counts on, if any.
    pub time: Option<usize>,
    /// Forget a key's values this long after its row's event time, on the watermark's clock (the
    /// upsert source's `state_ttl`: by then the source no longer retracts the row).
    pub ttl_ms: Option<i64>,
    /// Whether rows reach the lookup hash-partitioned by `key` (else it is chained to its source,
    /// whose subtasks own partitions, not key groups).
    pub keyed: bool,
}

/// A source's event-time settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventTime {
    /// Index of the TIMESTAMP column.
    pub column: usize,
    /// Watermark lag behind the largest event time seen.
    pub allowed_delay_ms: i64,
    /// Idle time after which the watermark follows wall-clock time.
    pub idle_timeout_ms: i64,
}

/// Shortest slide a window may have: every slide fires the window for each of its keys.
pub const MIN_SLIDE_MS: i64 = 100;
/// Most slices (`size / gcd(size, slide)`) a window may have: MIN and MAX merge them all per key.
pub const MAX_SLICES: i64 = 100_000;
/// Shortest `idle_timeout`: below it the watermark would follow the clock between records.
pub const MIN_IDLE_TIMEOUT_MS: i64 = 100;

/// A window operator's plan. Output rows are `key columns…, window_start, window_end, aggregates…`.
#[derive(Debug, Clone)]
pub struct WindowPlan {
    /// Window length.
    pub size_ms: i64,
    /// Distance between window ends (= size for TUMBLE).
    pub slide_ms: i64,
    /// Input columns grouped by.
    pub key: Vec<usize>,
    /// Input TIMESTAMP column windows are assigned by.
    pub time_column: usize,
    /// Aggregates, in output order.
    pub aggregates: Vec<Aggregate>,
    /// What happens to a row an aggregate's argument fails on.
    pub bad_records: connectors::BadRecordPolicy,
    /// Where `bad_records = "dead-letter"` puts such rows.
    pub dead_letter_path: Option<String>,
}

impl WindowPlan {
    /// Slice (pane) length: gcd(size, slide). Each record updates exactly one slice.
    pub fn slice_ms(&self) -> i64 {
        gcd(self.size_ms, self.slide_ms)
    }
}

/// A stage that sets bad rows aside in dead letters must say where.
fn check_dead_letters(at: &dyn Fn(&str) -> String, policy: connectors::BadRecordPolicy, path: &Option<String>) -> Result<(), SpecError> {
    if policy == connectors::BadRecordPolicy::DeadLetter && path.is_none() {
        return Err(SpecError::new(at("dead_letter_path"), "bad_records = \"dead-letter\" needs a file to write them to"));
    }
    Ok(())
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One aggregate of a window.
#[derive(Debug, Clone)]
pub struct Aggregate {
    /// Output column name.
    pub name: String,
    /// The function.
    pub func: AggFunc,
    /// Its argument; `None` for `COUNT(*)`.
    pub arg: Option<Expr>,
    /// Output type.
    pub data_type: DataType,
}

/// Aggregate functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFunc {
    /// SUM (retractable)
    Sum,
    /// COUNT (retractable)
    Count,
    /// MIN
    Min,
    /// MAX
    Max,
    /// AVG (retractable)
    Avg,
}

/// A chain of operators run together as one task per subtask.
#[derive(Debug, Clone)]
pub struct Vertex {
    /// Index in [`Plan::vertices`].
    pub id: usize,
    /// Operator indexes, upstream first.
    pub operators: Vec<usize>,
    /// Parallel tasks.
    pub parallelism: u32,
}

/// Which output of a vertex an edge reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The last operator's main output.
    Main,
    /// A window's late records.
    Late,
}

/// How an edge routes rows to the downstream subtasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partition {
    /// Subtask i sends to subtask i.
    Forward,
    /// Round-robin over downstream subtasks, batch by batch.
    Rebalance,
    /// By key group of these columns.
    Hash(Vec<usize>),
    /// Every row to every downstream subtask.
    Broadcast,
    /// Everything to the single downstream subtask.
    Global,
}

/// An exchange between two vertices.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Upstream vertex.
    pub from: usize,
    /// Which output of it.
    pub port: Port,
    /// Downstream vertex.
    pub to: usize,
    /// Routing.
    pub partition: Partition,
}

impl Partition {
    /// How specs name it.
    pub fn name(&self) -> &'static str {
        match self {
            Partition::Forward => "forward",
            Partition::Rebalance => "rebalance",
            Partition::Hash(_) => "hash",
            Partition::Broadcast => "broadcast",
            Partition::Global => "global",
        }
    }
}

/// Identifies one task: subtask `subtask` of vertex `vertex`. Printed as `vertex.subtask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    /// Vertex index.
    pub vertex: usize,
    /// Subtask index.
    pub subtask: u32,
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.vertex, self.subtask)
    }
}

impl std::str::FromStr for TaskId {
    type Err = String;
    fn from_str(s: &str) -> Result<TaskId, String> {
        let (v, t) = s.split_once('.').ok_or_else(|| format!("bad task id `{s}`"))?;
        Ok(TaskId {
            vertex: v.parse().map_err(|_| format!("bad task id `{s}`"))?,
            subtask: t.parse().map_err(|_| format!("bad task id `{s}`"))?,
        })
    }
}

/// One input channel of a task: rows from `upstream` over edge `edge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputChannel {
    /// Index in [`Plan::edges`].
    pub edge: usize,
    /// The sending task.
    pub upstream: TaskId,
}

impl Plan {
    /// Every task of the plan.
    pub fn tasks(&self) -> Vec<TaskId> {
        self.vertices.iter().flat_map(|v| (0..v.parallelism).map(move |s| TaskId { vertex: v.id, subtask: s })).collect()
    }

    /// Whether a vertex starts with a source (its tasks inject checkpoint barriers).
    pub fn is_source_vertex(&self, vertex: usize) -> bool {
        self.vertices.get(vertex).is_some_and(|v| matches!(self.operators[v.operators[0]].kind, OperatorKind::Source { .. }))
    }

    /// Chained operator names of a vertex, e.g. `events -> hop`.
    pub fn vertex_label(&self, vertex: usize) -> String {
        self.vertices[vertex].operators.iter().map(|&o| self.operators[o].name.as_str()).collect::<Vec<_>>().join(" -> ")
    }

    /// The largest parallelism of any vertex: the slots this job needs (slot sharing, as in Flink).
    pub fn slots_needed(&self) -> u32 {
        self.vertices.iter().map(|v| v.parallelism).max().unwrap_or(0)
    }

    /// The input channels of a task, in a fixed order both ends agree on.
    pub fn inputs(&self, task: TaskId) -> Vec<InputChannel> {
        let mut out = Vec::new();
        for (i, e) in self.edges.iter().enumerate().filter(|(_, e)| e.to == task.vertex) {
            let up = self.vertices[e.from].parallelism;
            match e.partition {
                Partition::Forward => out.push(InputChannel { edge: i, upstream: TaskId { vertex: e.from, subtask: task.subtask } }),
                _ => out.extend((0..up).map(|s| InputChannel { edge: i, upstream: TaskId { vertex: e.from, subtask: s } })),
            }
        }
        out
    }

    /// Where a task's output on `edge` goes: the receiving tasks with the index of this channel
    /// among each receiver's inputs.
    pub fn outputs(&self, task: TaskId, edge: usize) -> Vec<(TaskId, usize)> {
        let e = &self.edges[edge];
        let down = self.vertices[e.to].parallelism;
        let targets: Vec<u32> = match e.partition {
            Partition::Forward => vec![task.subtask],
            _ => (0..down).collect(),
        };
        targets
            .into_iter()
            .map(|s| {
                let receiver = TaskId { vertex: e.to, subtask: s };
                let index = self
                    .inputs(receiver)
                    .iter()
                    .position(|c| c.edge == edge && c.upstream == task)
                    .expect("outputs and inputs are derived from the same edge");
                (receiver, index)
            })
            .collect()
    }
}

/// Plans a parsed spec, checking everything that can be checked before running it.
pub fn plan(spec: &JobSpec) -> Result<Plan, SpecError> {
    Planner::new(spec)?.run()
}

enum Stage<'a> {
    Source(usize),
    Transform(&'a TransformSpec),
    Window(&'a WindowSpec),
    Lookup(&'a LookupSpec),
    Sink(&'a SinkSpec),
}

impl Stage<'_> {
    fn field(&self, spec: &JobSpec) -> String {
        match self {
            Stage::Source(i) => format!("source[{}]", spec.sources[*i].name),
            Stage::Transform(t) => format!("transform[{}]", t.name),
            Stage::Window(w) => format!("window[{}]", w.name),
            Stage::Lookup(l) => format!("lookup[{}]", l.name),
            Stage::Sink(s) => format!("sink[{}]", s.name),
        }
    }
    fn input(&self) -> Option<&str> {
        match self {
            Stage::Source(_) => None,
            Stage::Transform(t) => Some(&t.input),
            Stage::Window(w) => Some(&w.input),
            Stage::Lookup(l) => Some(&l.input),
            Stage::Sink(s) => Some(&s.input),
        }
    }
}

struct Planner<'a> {
    spec: &'a JobSpec,
    max_parallelism: u32,
    default_parallelism: u32,
    stages: Vec<(String, Stage<'a>)>,
    by_name: HashMap<String, usize>,
    /// Stage index -> operator index, once planned.
    planned: HashMap<usize, usize>,
    operators: Vec<Operator>,
    /// Operator -> (input operator, port, partition).
    links: Vec<Option<(usize, Port, Partition)>>,
    /// Operator -> name of its event-time column, carried through transforms.
    time_columns: Vec<Option<String>>,
}

impl<'a> Planner<'a> {
    fn new(spec: &'a JobSpec) -> Result<Planner<'a>, SpecError> {
        if spec.name.trim().is_empty() {
            return Err(SpecError::new("name", "must not be empty"));
        }
        let max_parallelism = spec.max_parallelism.unwrap_or(DEFAULT_MAX_PARALLELISM);
        if !(1..=32_768).contains(&max_parallelism) {
            return Err(SpecError::new("max_parallelism", "must be between 1 and 32768"));
        }
        let default_parallelism = spec.parallelism.unwrap_or(1);
        check_parallelism("parallelism", default_parallelism, max_parallelism)?;
        if spec.sources.is_empty() {
            return Err(SpecError::new("source", "a job needs at least one [[source]]"));
        }
        if spec.sinks.is_empty() {
            return Err(SpecError::new("sink", "a job needs at least one [[sink]]"));
        }
        let mut stages = Vec::new();
        stages.extend((0..spec.sources.len()).map(|i| (spec.sources[i].name.clone(), Stage::Source(i))));
        stages.extend(spec.transforms.iter().map(|t| (t.name.clone(), Stage::Transform(t))));
        stages.extend(spec.windows.iter().map(|w| (w.name.clone(), Stage::Window(w))));
        stages.extend(spec.lookups.iter().map(|l| (l.name.clone(), Stage::Lookup(l))));
        stages.extend(spec.sinks.iter().map(|s| (s.name.clone(), Stage::Sink(s))));
        let mut by_name = HashMap::new();
        for (i, (name, stage)) in stages.iter().enumerate() {
            let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(SpecError::new(
                    format!("{}.name", stage.field(spec)),
                    "expected a non-empty name of letters, digits, `_` or `-`",
                ));
            }
            if by_name.insert(name.clone(), i).is_some() {
                return Err(SpecError::new(
                    format!("{}.name", stage.field(spec)),
                    format!("stage name `{name}` is used twice; names must be unique"),
                ));
            }
        }
        Ok(Planner {
            spec,
            max_parallelism,
            default_parallelism,
            stages,
            by_name,
            planned: HashMap::new(),
            operators: Vec::new(),
            links: Vec::new(),
            time_columns: Vec::new(),
        })
    }

    fn run(mut self) -> Result<Plan, SpecError> {
        for i in 0..self.stages.len() {
            self.plan_stage(i, &mut Vec::new())?;
        }
        // Every non-sink stage must feed something, or its work is lost without a word.
        let mut consumed = vec![false; self.operators.len()];
        for (input, _, _) in self.links.iter().flatten() {
            consumed[*input] = true;
        }
        for (i, op) in self.operators.iter().enumerate() {
            if !consumed[i] && !matches!(op.kind, OperatorKind::Sink { .. }) {
                let stage = &self.stages[self.by_name[&op.name]].1;
                return Err(SpecError::new(
                    stage.field(self.spec),
                    format!("stage `{}` is read by nothing; add a [[sink]] with input = \"{}\"", op.name, op.name),
                ));
            }
        }
        self.check_state_ttls()?;
        self.check_slots()?;
        let (vertices, edges) = self.chain();
        Ok(Plan {
            name: self.spec.name.clone(),
            max_parallelism: self.max_parallelism,
            operators: self.operators,
            vertices,
            edges,
            state: StatePlan::from_spec(&self.spec.state)?,
        })
    }

    /// Each `postgres_cdc` source reads a replication slot of its own: two on one slot (two names
    /// of `tables` that make the same slot, say) would fight over it at run time.
    fn check_slots(&self) -> Result<(), SpecError> {
        let mut seen: HashMap<(&str, &str), &str> = HashMap::new();
        for op in &self.operators {
            let OperatorKind::Source { connector: SourceConnector::PostgresCdc(o), .. } = &op.kind else { continue };
            if let Some(other) = seen.insert((o.url.as_str(), o.slot.as_str()), op.name.as_str()) {
                return Err(SpecError::new(
                    format!("source[{}].options.slot", op.name),
                    format!("slot `{}` is source `{other}`'s too; each source reads a slot of its own: give one of them another", o.slot),
                ));
            }
        }
        Ok(())
    }

    /// An upsert source's `state_ttl` must outlast every window it feeds (size plus the source's
    /// allowed delay): a record replayed after its key's state expired is taken for a new row, which
    /// a window still open would count twice.
    fn check_state_ttls(&self) -> Result<(), SpecError> {
        for (w, op) in self.operators.iter().enumerate() {
            let OperatorKind::Window(window) = &op.kind else { continue };
            let mut at = w;
            while let Some((input, _, _)) = self.links[at] {
                at = input;
            }
            let OperatorKind::Source { connector: SourceConnector::Kafka(o), event_time } = &self.operators[at].kind else { continue };
            let Some(ttl) = o.state_ttl_ms() else { continue };
            let needed = window.size_ms + event_time.map_or(0, |e| e.allowed_delay_ms);
            if ttl < needed {
                let source = &self.stages[self.by_name[&self.operators[at].name]].1;
                return Err(SpecError::new(
                    format!("{}.options.state_ttl", source.field(self.spec)),
                    format!(
                        "{ttl} ms is shorter than window `{}`'s size plus the allowed delay ({needed} ms): a record replayed after its key's state expired would count twice there; set at least that",
                        op.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Plans stage `i` after its input (depth first), returning its operator index.
    fn plan_stage(&mut self, i: usize, path: &mut Vec<usize>) -> Result<usize, SpecError> {
        if let Some(&op) = self.planned.get(&i) {
            return Ok(op);
        }
        let field = self.stages[i].1.field(self.spec);
        if path.contains(&i) {
            return Err(SpecError::new(format!("{field}.input"), "stages read each other in a cycle"));
        }
        path.push(i);
        let input = match self.stages[i].1.input() {
            None => None,
            Some(raw) => {
                let (name, port) = match raw.strip_suffix(".late") {
                    Some(n) => (n, Port::Late),
                    None => (raw, Port::Main),
                };
                let &up = self.by_name.get(name).ok_or_else(|| {
                    SpecError::new(format!("{field}.input"), format!("no stage named `{name}`; stages: {}", self.stage_names()))
                })?;
                if let Stage::Sink(_) = self.stages[up].1 {
                    return Err(SpecError::new(format!("{field}.input"), format!("`{name}` is a sink; sinks cannot be read")));
                }
                if port == Port::Late && !matches!(self.stages[up].1, Stage::Window(_)) {
                    return Err(SpecError::new(format!("{field}.input"), format!("`{raw}`: only windows have a `.late` output")));
                }
                Some((self.plan_stage(up, path)?, port))
            }
        };
        path.pop();
        let (op, link, time) = self.build(i, &field, input)?;
        self.operators.push(op);
        self.links.push(link);
        self.time_columns.push(time);
        let index = self.operators.len() - 1;
        self.planned.insert(i, index);
        Ok(index)
    }

    fn stage_names(&self) -> String {
        self.stages.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
    }

    #[allow(clippy::type_complexity)]
    fn build(
        &self,
        i: usize,
        field: &str,
        input: Option<(usize, Port)>,
    ) -> Result<(Operator, Option<(usize, Port, Partition)>, Option<String>), SpecError> {
        let at = |suffix: &str| format!("{field}.{suffix}");
        let input_schema = |(op, port): (usize, Port)| -> Schema {
            match port {
                Port::Main => self.operators[op].schema.clone(),
                Port::Late => self.window_input_schema(op),
            }
        };
        match &self.stages[i].1 {
            Stage::Source(s) => {
                let s = &self.spec.sources[*s];
                let (connector, schema) = connectors::source(&s.connector, &s.options).map_err(|m| split_field(field, &m))?;
                let single = connector.capabilities().single_instance;
                if let Some(why) = single.filter(|_| s.parallelism.is_some_and(|p| p != 1)) {
                    return Err(SpecError::new(at("parallelism"), format!("{why}; remove `parallelism` or set it to 1")));
                }
                let single = single.is_some();
                let parallelism = self.parallelism(&at("parallelism"), s.parallelism.or(single.then_some(1)))?;
                let event_time = match &s.event_time {
                    None => None,
                    Some(et) => {
                        let column = schema.index_of(&et.column).ok_or_else(|| {
                            SpecError::new(
                                at("event_time.column"),
                                format!("unknown column `{}`; available: {}", et.column, schema.names()),
                            )
                        })?;
                        if schema.fields[column].data_type != DataType::Timestamp {
                            return Err(SpecError::new(
                                at("event_time.column"),
                                format!("`{}` is {}, expected TIMESTAMP", et.column, schema.fields[column].data_type),
                            ));
                        }
                        let duration = |name: &str, v: &Option<String>, default: i64| match v {
                            None => Ok(default),
                            Some(t) => parse_duration_ms(t).map_err(|m| SpecError::new(at(name), m)),
                        };
                        let idle_timeout_ms = duration("event_time.idle_timeout", &et.idle_timeout, 5_000)?;
                        if idle_timeout_ms < MIN_IDLE_TIMEOUT_MS {
                            return Err(SpecError::new(
                                at("event_time.idle_timeout"),
                                format!("must be at least {MIN_IDLE_TIMEOUT_MS}ms: a shorter one moves the watermark with the clock between any two records, ahead of the data"),
                            ));
                        }
                        Some(EventTime {
                            column,
                            allowed_delay_ms: duration("event_time.allowed_delay", &et.allowed_delay, 0)?,
                            idle_timeout_ms,
                        })
                    }
                };
                if matches!(&connector, SourceConnector::Kafka(o) if o.heartbeats) && event_time.is_none() {
                    return Err(SpecError::new(
                        at("options.heartbeats"),
                        "heartbeats move the source's watermark, which needs event_time on the source; add it, or remove heartbeats",
                    ));
                }
                let time = event_time.map(|e| schema.fields[e.column].name.clone());
                let op = Operator { name: s.name.clone(), kind: OperatorKind::Source { connector, event_time }, parallelism, schema };
                Ok((op, None, time))
            }
            Stage::Transform(t) => {
                let (up, port) = input.expect("transforms have an input");
                let schema_in = input_schema((up, port));
                let filter = match &t.filter {
                    None => None,
                    Some(sql) => {
                        let e = Expr::compile(sql, &schema_in).map_err(|e| SpecError::new(at("where"), e.to_string()))?;
                        if e.data_type() != DataType::Bool {
                            return Err(SpecError::new(at("where"), format!("must be a BOOLEAN condition, got {}", e.data_type())));
                        }
                        Some(e)
                    }
                };
                let (projection, schema) = match &t.select {
                    None => (None, schema_in.clone()),
                    Some(sql) => {
                        let items = parse_select_list(sql).map_err(|e| SpecError::new(at("select"), e.to_string()))?;
                        let mut exprs = Vec::new();
                        let mut fields = Vec::new();
                        for (name, ast) in items {
                            // Names are distinct: `parse_select_list` checked them.
                            let e = Expr::from_ast(&ast, &schema_in).map_err(|e| SpecError::new(at("select"), e.to_string()))?;
                            fields.push(Field::new(name, e.data_type()));
                            exprs.push(e);
                        }
                        (Some(exprs), Schema::new(fields))
                    }
                };
                let time = self.time_columns[up].clone().filter(|c| {
                    port == Port::Main
                        && match &projection {
                            None => true,
                            Some(exprs) => exprs
                                .iter()
                                .zip(&schema.fields)
                                .any(|(e, f)| e.as_column() == schema_in.index_of(c) && f.name.eq_ignore_ascii_case(c)),
                        }
                });
                check_dead_letters(&at, t.bad_records, &t.dead_letter_path)?;
                let parallelism = self.parallelism(&at("parallelism"), t.parallelism.or(Some(self.operators[up].parallelism)))?;
                let partition = self.partition(field, t.partition.as_deref(), t.key.as_deref(), &schema_in, up, parallelism)?;
                let op = Operator {
                    name: t.name.clone(),
                    kind: OperatorKind::Transform {
                        filter,
                        projection,
                        bad_records: t.bad_records,
                        dead_letter_path: t.dead_letter_path.clone(),
                    },
                    parallelism,
                    schema,
                };
                Ok((op, Some((up, port, partition)), time))
            }
            Stage::Window(w) => {
                let (up, port) = input.expect("windows have an input");
                let schema_in = input_schema((up, port));
                let size_ms = parse_duration_ms(&w.size).map_err(|m| SpecError::new(at("size"), m))?;
                if size_ms <= 0 {
                    return Err(SpecError::new(at("size"), "must be longer than 0"));
                }
                let slide_ms = match (w.kind.to_ascii_lowercase().as_str(), &w.slide) {
                    ("tumble", None) => size_ms,
                    ("tumble", Some(_)) => {
                        return Err(SpecError::new(at("slide"), "a tumble window has no slide; remove it or use kind = \"hop\""))
                    }
                    ("hop", Some(s)) => parse_duration_ms(s).map_err(|m| SpecError::new(at("slide"), m))?,
                    ("hop", None) => return Err(SpecError::new(at("slide"), "a hop window needs a slide, e.g. slide = \"5s\"")),
                    (other, _) => return Err(SpecError::new(at("kind"), format!("unknown window kind `{other}`; expected tumble or hop"))),
                };
                if slide_ms <= 0 || slide_ms > size_ms {
                    return Err(SpecError::new(at("slide"), "must be longer than 0 and no longer than size"));
                }
                if slide_ms < MIN_SLIDE_MS {
                    return Err(SpecError::new(
                        at("slide"),
                        format!("must be at least {MIN_SLIDE_MS}ms: each slide fires the window for every key"),
                    ));
                }
                let slices = size_ms / gcd(size_ms, slide_ms);
                if slices > MAX_SLICES {
                    return Err(SpecError::new(
                        at("slide"),
                        format!("size / gcd(size, slide) is {slices} slices; at most {MAX_SLICES} are allowed (use a slide that divides the size, or a longer one)"),
                    ));
                }
                if w.key.is_empty() {
                    return Err(SpecError::new(at("key"), "a window needs at least one key column"));
                }
                let mut key = Vec::new();
                for k in &w.key {
                    key.push(
                        schema_in
                            .index_of(k)
                            .ok_or_else(|| SpecError::new(at("key"), format!("unknown column `{k}`; available: {}", schema_in.names())))?,
                    );
                }
                let time_name = match (&w.time, &self.time_columns[up]) {
                    (Some(t), _) => t.clone(),
                    (None, Some(t)) if port == Port::Main => t.clone(),
                    _ => {
                        return Err(SpecError::new(
                            at("time"),
                            "no event-time column reaches this window; set `time` to a TIMESTAMP column or `event_time` on the source",
                        ))
                    }
                };
                let time_column = schema_in
                    .index_of(&time_name)
                    .ok_or_else(|| SpecError::new(at("time"), format!("unknown column `{time_name}`; available: {}", schema_in.names())))?;
                if schema_in.fields[time_column].data_type != DataType::Timestamp {
                    return Err(SpecError::new(
                        at("time"),
                        format!("`{time_name}` is {}, expected TIMESTAMP", schema_in.fields[time_column].data_type),
                    ));
                }
                let aggregates = self.aggregates(&at("aggregates"), &w.aggregates, &schema_in)?;
                let mut fields: Vec<Field> = key.iter().map(|&k| schema_in.fields[k].clone()).collect();
                fields.push(Field::new("window_start", DataType::Timestamp));
                fields.push(Field::new("window_end", DataType::Timestamp));
                for a in &aggregates {
                    if fields.iter().any(|f| f.name.eq_ignore_ascii_case(&a.name)) {
                        return Err(SpecError::new(
                            at("aggregates"),
                            format!("output column `{}` appears twice; rename it with AS", a.name),
                        ));
                    }
                    fields.push(Field::new(a.name.clone(), a.data_type));
                }
                check_dead_letters(&at, w.bad_records, &w.dead_letter_path)?;
                let parallelism = self.parallelism(&at("parallelism"), w.parallelism)?;
                let op = Operator {
                    name: w.name.clone(),
                    kind: OperatorKind::Window(WindowPlan {
                        size_ms,
                        slide_ms,
                        key: key.clone(),
                        time_column,
                        aggregates,
                        bad_records: w.bad_records,
                        dead_letter_path: w.dead_letter_path.clone(),
                    }),
                    parallelism,
                    schema: Schema::new(fields),
                };
                Ok((op, Some((up, port, Partition::Hash(key))), Some("window_end".into())))
            }
            Stage::Lookup(l) => {
                let (up, port) = input.expect("lookups have an input");
                let schema_in = input_schema((up, port));
                let (options, columns) = connectors::lookup(&l.connector, &l.options).map_err(|m| split_field(field, &m))?;
                let on = schema_in
                    .index_of(&l.on)
                    .ok_or_else(|| SpecError::new(at("on"), format!("unknown column `{}`; available: {}", l.on, schema_in.names())))?;
                let mut fields = schema_in.fields.clone();
                for f in &columns.fields {
                    if schema_in.index_of(&f.name).is_some() {
                        return Err(SpecError::new(
                            at("options.columns"),
                            format!("`{}` is already an input column; rename it in the table or view", f.name),
                        ));
                    }
                    fields.push(f.clone());
                }
                let time = self.time_columns[up].clone().filter(|_| port == Port::Main);
                let parallelism = self.parallelism(&at("parallelism"), l.parallelism.or(Some(self.operators[up].parallelism)))?;
                let mut partition = self.partition(field, None, None, &schema_in, up, parallelism)?;
                let remember = self.changelog_key((up, port)).and_then(|(key, ttl_ms)| {
                    let key = key.iter().map(|k| schema_in.index_of(k)).collect::<Option<Vec<usize>>>()?;
                    // An update's two rows must meet in one subtask: spread by key, not round robin.
                    if partition == Partition::Rebalance {
                        partition = Partition::Hash(key.clone());
                    }
                    let time = time.as_deref().and_then(|t| schema_in.index_of(t));
                    let keyed = matches!(partition, Partition::Hash(_));
                    Some(LookupMemory { key, ttl_ms: ttl_ms.filter(|_| time.is_some()), time, keyed })
                });
                let op = Operator {
                    name: l.name.clone(),
                    kind: OperatorKind::Lookup { options, on, columns, remember },
                    parallelism,
                    schema: Schema::new(fields),
                };
                Ok((op, Some((up, port, partition)), time))
            }
            Stage::Sink(s) => {
                let (up, port) = input.expect("sinks have an input");
                let schema_in = input_schema((up, port));
                let mut connector = connectors::sink(&s.connector, &s.options, &schema_in).map_err(|m| split_field(field, &m))?;
                let single = connector.capabilities().single_instance;
                if let SinkConnector::Redis(o) = &mut connector {
                    if let (OperatorKind::Window(w), Port::Main) = (&self.operators[up].kind, port) {
                        o.window_slide_ms = Some(w.slide_ms);
                    }
                }
                if let Some(why) = single.filter(|_| s.parallelism.is_some_and(|p| p != 1)) {
                    return Err(SpecError::new(at("parallelism"), format!("{why}; remove `parallelism` or set it to 1")));
                }
                let default = if single.is_some() { 1 } else { self.operators[up].parallelism };
                let parallelism = self.parallelism(&at("parallelism"), s.parallelism.or(Some(default)))?;
                let partition = self.partition(field, s.partition.as_deref(), None, &schema_in, up, parallelism)?;
                let op = Operator { name: s.name.clone(), kind: OperatorKind::Sink { connector }, parallelism, schema: schema_in };
                Ok((op, Some((up, port, partition)), None))
            }
        }
    }

    fn window_input_schema(&self, window_op: usize) -> Schema {
        let input = self.links[window_op].as_ref().expect("a window has an input");
        match input.1 {
            Port::Main => self.operators[input.0].schema.clone(),
            Port::Late => self.window_input_schema(input.0),
        }
    }

    /// The key (column names) and state time to live of the changelog that output `port` of
    /// operator `op` carries: an upsert or CDC source's primary key, through the transforms and
    /// lookups after it. `None` for an append-only stream or a window's output.
    fn changelog_key(&self, (op, port): (usize, Port)) -> Option<(Vec<String>, Option<i64>)> {
        if port != Port::Main {
            return None;
        }
        match &self.operators[op].kind {
            OperatorKind::Source { connector: SourceConnector::Kafka(o), .. } if o.format == connectors::KafkaFormat::UpsertJson => {
                Some((o.primary_key.clone(), o.state_ttl_ms()))
            }
            OperatorKind::Source { connector: SourceConnector::PostgresCdc(o), .. } => Some((o.primary_key.clone(), None)),
            OperatorKind::Transform { .. } | OperatorKind::Lookup { .. } => {
                let (up, port, _) = self.links[op].clone()?;
                self.changelog_key((up, port))
            }
            _ => None,
        }
    }

    fn parallelism(&self, field: &str, p: Option<u32>) -> Result<u32, SpecError> {
        let p = p.unwrap_or(self.default_parallelism);
        check_parallelism(field, p, self.max_parallelism)?;
        Ok(p)
    }

    fn partition(
        &self,
        field: &str,
        requested: Option<&str>,
        key: Option<&[String]>,
        schema_in: &Schema,
        up: usize,
        parallelism: u32,
    ) -> Result<Partition, SpecError> {
        let up_parallelism = self.operators[up].parallelism;
        let at = format!("{field}.partition");
        let p = match requested {
            None if up_parallelism == parallelism => Partition::Forward,
            None if parallelism == 1 => Partition::Global,
            None => Partition::Rebalance,
            Some("forward") if up_parallelism != parallelism => {
                return Err(SpecError::new(
                    at,
                    format!("forward needs equal parallelism, but the input has {up_parallelism} and this stage {parallelism}"),
                ))
            }
            Some("forward") => Partition::Forward,
            Some("rebalance") => Partition::Rebalance,
            Some("broadcast") => Partition::Broadcast,
            Some("global") if parallelism != 1 => {
                return Err(SpecError::new(at, "global sends everything to one task; set parallelism = 1"))
            }
            Some("global") => Partition::Global,
            Some("hash") => {
                let key = key
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| SpecError::new(format!("{field}.key"), "partition = \"hash\" needs key = [\"column\", …]"))?;
                let mut cols = Vec::new();
                for k in key {
                    cols.push(schema_in.index_of(k).ok_or_else(|| {
                        SpecError::new(format!("{field}.key"), format!("unknown column `{k}`; available: {}", schema_in.names()))
                    })?);
                }
                Partition::Hash(cols)
            }
            Some(other) => {
                return Err(SpecError::new(
                    at,
                    format!("unknown partition `{other}`; expected forward, rebalance, hash, broadcast or global"),
                ))
            }
        };
        if key.is_some() && !matches!(p, Partition::Hash(_)) {
            return Err(SpecError::new(format!("{field}.key"), "key is only used with partition = \"hash\""));
        }
        Ok(p)
    }

    fn aggregates(&self, field: &str, sql: &str, schema: &Schema) -> Result<Vec<Aggregate>, SpecError> {
        let items = parse_select_list(sql).map_err(|e| SpecError::new(field, e.to_string()))?;
        if items.is_empty() {
            return Err(SpecError::new(field, "expected at least one aggregate, e.g. `SUM(score) AS total`"));
        }
        let mut out = Vec::new();
        for (name, ast) in items {
            let ast::Expr::Function(f) = &ast else {
                return Err(SpecError::new(
                    field,
                    format!("`{ast}` is not an aggregate; expected SUM, COUNT, MIN, MAX or AVG of an expression"),
                ));
            };
            let func = match f.name.to_string().to_ascii_uppercase().as_str() {
                "SUM" => AggFunc::Sum,
                "COUNT" => AggFunc::Count,
                "MIN" => AggFunc::Min,
                "MAX" => AggFunc::Max,
                "AVG" => AggFunc::Avg,
                other => return Err(SpecError::new(field, format!("unknown aggregate `{other}`; expected SUM, COUNT, MIN, MAX or AVG"))),
            };
            let args = match &f.args {
                FunctionArguments::List(l) if l.duplicate_treatment.is_none() && l.clauses.is_empty() => &l.args,
                _ => return Err(SpecError::new(field, format!("`{ast}`: expected one argument, e.g. SUM(score)"))),
            };
            let arg = match args.as_slice() {
                [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] if func == AggFunc::Count => None,
                [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => {
                    Some(Expr::from_ast(e, schema).map_err(|e| SpecError::new(field, e.to_string()))?)
                }
                _ => return Err(SpecError::new(field, format!("`{ast}`: expected one argument, e.g. SUM(score)"))),
            };
            let arg_type = arg.as_ref().map(|a| a.data_type());
            let data_type = match (func, arg_type) {
                (AggFunc::Count, _) => DataType::Int,
                (AggFunc::Sum, Some(t)) if t.is_numeric() => t,
                (AggFunc::Avg, Some(t)) if t.is_numeric() => DataType::Float,
                (AggFunc::Min | AggFunc::Max, Some(t)) if t != DataType::Bool => t,
                (_, t) => {
                    return Err(SpecError::new(
                        field,
                        format!(
                            "`{ast}`: cannot aggregate {}; SUM and AVG need a number, MIN and MAX a number, string or timestamp",
                            t.map(|t| t.to_string()).unwrap_or_default()
                        ),
                    ))
                }
            };
            out.push(Aggregate { name, func, arg, data_type });
        }
        Ok(out)
    }

    /// Groups operators into vertices and derives the edges between them.
    fn chain(&self) -> (Vec<Vertex>, Vec<Edge>) {
        let n = self.operators.len();
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (op, link) in self.links.iter().enumerate() {
            if let Some((up, _, _)) = link {
                consumers[*up].push(op);
            }
        }
        // An operator joins its input's chain when it is that input's only consumer, reads its main
        // output through a forward exchange, and runs at the same parallelism.
        let chained = |op: usize| match &self.links[op] {
            Some((up, Port::Main, Partition::Forward)) => {
                consumers[*up].len() == 1 && self.operators[*up].parallelism == self.operators[op].parallelism
            }
            _ => false,
        };
        let mut vertex_of = vec![usize::MAX; n];
        let mut vertices: Vec<Vertex> = Vec::new();
        for op in 0..n {
            if chained(op) {
                let up = self.links[op].as_ref().expect("chained operators have an input").0;
                let v = vertex_of[up];
                vertices[v].operators.push(op);
                vertex_of[op] = v;
            } else {
                vertex_of[op] = vertices.len();
                vertices.push(Vertex { id: vertices.len(), operators: vec![op], parallelism: self.operators[op].parallelism });
            }
        }
        let edges = (0..n)
            .filter(|&op| !chained(op))
            .filter_map(|op| {
                let (up, port, partition) = self.links[op].clone()?;
                Some(Edge { from: vertex_of[up], port, to: vertex_of[op], partition })
            })
            .collect();
        (vertices, edges)
    }
}

fn check_parallelism(field: &str, p: u32, max: u32) -> Result<(), SpecError> {
    if p == 0 || p > max {
        return Err(SpecError::new(field, format!("must be between 1 and max_parallelism ({max}), got {p}")));
    }
    Ok(())
}

/// Connector messages start with the option's path (`options.count: …`); attach it to the stage.
fn split_field(stage: &str, message: &str) -> SpecError {
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => SpecError::new(format!("{stage}.{path}"), rest),
        _ => SpecError::new(stage, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile;
    use proptest::prelude::*;

    const VALID: &str = r#"
name = "j"

[[source]]
name = "events"
connector = "generator"
options = { count = 10, keys = 5 }
event_time = { column = "ts", allowed_delay = "1s" }

[[transform]]
name = "scored"
input = "events"
select = "k, score * 2 AS doubled, ts"
where = "score > 10"

[[window]]
name = "hop"
input = "scored"
kind = "hop"
size = "10m"
slide = "5s"
key = ["k"]
aggregates = "SUM(doubled) AS total, COUNT(*) AS n, MAX(doubled) AS top"
parallelism = 4

[[sink]]
name = "out"
input = "hop"
connector = "file"
options = { path = "/tmp/out.jsonl" }
"#;

    #[test]
    fn plans_chains_and_exchanges() {
        let plan = compile(VALID).unwrap();
        // events -> scored chain (forward, parallelism 1); hop -> out chain (forward, parallelism 4).
        assert_eq!(plan.vertices.len(), 2);
        assert_eq!(plan.vertex_label(0), "events -> scored");
        assert_eq!(plan.vertex_label(1), "hop -> out");
        assert_eq!(plan.edges.len(), 1);
        assert_eq!(plan.edges[0].partition, Partition::Hash(vec![0]));
        assert_eq!(plan.slots_needed(), 4);
        let names: Vec<_> = plan.operators[2].schema.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["k", "window_start", "window_end", "total", "n", "top"]);
        let OperatorKind::Window(w) = &plan.operators[2].kind else { panic!("window expected") };
        assert_eq!(w.slice_ms(), 5_000);
        // Each window subtask reads from the single upstream subtask; the two ends agree on indexes.
        for s in 0..4 {
            let inputs = plan.inputs(TaskId { vertex: 1, subtask: s });
            assert_eq!(inputs.len(), 1);
        }
        let outs = plan.outputs(TaskId { vertex: 0, subtask: 0 }, 0);
        assert_eq!(outs.len(), 4);
        assert!(outs.iter().all(|(_, input)| *input == 0));
    }

    #[test]
    fn a_window_sets_bad_rows_aside_where_its_spec_says() {
        let OperatorKind::Window(w) = &compile(VALID).unwrap().operators[2].kind else { panic!("window expected") };
        assert_eq!(w.bad_records, connectors::BadRecordPolicy::Drop);
        let spec = VALID.replace("parallelism = 4", "parallelism = 4\nbad_records = \"dead-letter\"");
        let e = compile(&spec).unwrap_err();
        assert_eq!(e.field, "window[hop].dead_letter_path");
        let with_path = spec.replace("bad_records = \"dead-letter\"", "bad_records = \"dead-letter\"\ndead_letter_path = \"/tmp/d.jsonl\"");
        let plan = compile(&with_path).unwrap();
        let OperatorKind::Window(w) = &plan.operators[2].kind else { panic!("window expected") };
        assert_eq!((w.bad_records, w.dead_letter_path.as_deref()), (connectors::BadRecordPolicy::DeadLetter, Some("/tmp/d.jsonl")));
    }

    #[test]
    fn event_time_follows_projection() {
        // Dropping `ts` in the transform leaves the window without event time.
        let e = compile(&VALID.replace("k, score * 2 AS doubled, ts", "k, score * 2 AS doubled")).unwrap_err();
        assert_eq!(e.field, "window[hop].time");
    }

    /// (text to replace, replacement, field the error must name)
    const MUTATIONS: &[(&str, &str, &str)] = &[
        ("name = \"j\"", "name = \"\"", "name"),
        ("count = 10", "count = \"ten\"", "source[events].options"),
        ("keys = 5", "keys = 5, colour = 1", "source[events].options"),
        ("connector = \"generator\"", "connector = \"kafkaa\"", "source[events].connector"),
        ("column = \"ts\"", "column = \"time\"", "source[events].event_time.column"),
        ("column = \"ts\"", "column = \"k\"", "source[events].event_time.column"),
        ("allowed_delay = \"1s\"", "allowed_delay = \"soon\"", "source[events].event_time.allowed_delay"),
        ("input = \"events\"", "input = \"evnets\"", "transform[scored].input"),
        ("score * 2 AS doubled", "scroe * 2 AS doubled", "transform[scored].select"),
        ("score * 2 AS doubled", "score || 2 > 1 AS doubled", "transform[scored].select"),
        ("score > 10", "score + 10", "transform[scored].where"),
        ("kind = \"hop\"", "kind = \"session\"", "window[hop].kind"),
        ("size = \"10m\"", "size = \"10 parsecs\"", "window[hop].size"),
        ("slide = \"5s\"", "slide = \"20m\"", "window[hop].slide"),
        ("slide = \"5s\"", "slide = \"1ms\"", "window[hop].slide"),
        ("slide = \"5s\"", "slide = \"101ms\"", "window[hop].slide"),
        ("allowed_delay = \"1s\"", "allowed_delay = \"1s\", idle_timeout = \"0s\"", "source[events].event_time.idle_timeout"),
        ("key = [\"k\"]", "key = [\"user\"]", "window[hop].key"),
        ("SUM(doubled) AS total", "SUM(ts) AS total", "window[hop].aggregates"),
        ("SUM(doubled) AS total", "MEDIAN(doubled) AS total", "window[hop].aggregates"),
        ("SUM(doubled) AS total", "SUM(doubled) AS k", "window[hop].aggregates"),
        ("parallelism = 4", "parallelism = 0", "window[hop].parallelism"),
        ("parallelism = 4", "parallelism = 500", "window[hop].parallelism"),
        ("input = \"hop\"", "input = \"hop.late.late\"", "sink[out].input"),
        ("connector = \"file\"", "connector = \"s3\"", "sink[out].connector"),
        ("path = \"/tmp/out.jsonl\"", "paht = \"/tmp/out.jsonl\"", "sink[out].options"),
        ("name = \"out\"", "name = \"hop\"", "sink[hop].name"),
        ("[[sink]]", "[[sinks]]", "sinks"),
    ];

    #[test]
    fn every_mutation_applies() {
        for (from, _, _) in MUTATIONS {
            assert!(VALID.contains(from), "fixture lacks `{from}`");
        }
    }

    proptest! {
        /// Any of these mistakes, alone or with a harmless change elsewhere, yields an error naming
        /// the offending field and nothing is planned.
        #[test]
        fn invalid_specs_name_the_field(i in 0..MUTATIONS.len(), harmless in any::<bool>()) {
            let (from, to, field) = MUTATIONS[i];
            let mut spec = VALID.replacen(from, to, 1);
            if harmless {
                spec = spec.replace("keys = 5", "keys = 6");
            }
            let e = compile(&spec).unwrap_err();
            prop_assert!(e.field == field || e.field.starts_with(&format!("{field}.")),
                "mutation {} -> {}: expected field {}, got {:?}", from, to, field, e);
        }
    }
}

#[cfg(test)]
mod shipped_specs {
    use crate::{compile, substitute_env};

    /// The shipped specs plan with their defaults: no environment needed.
    #[test]
    fn ingest_and_process_specs_are_valid() {
        for (name, text) in [("ingest", include_str!("../specs/ingest.toml")), ("process", include_str!("../specs/process.toml"))] {
            let text = substitute_env(text, |_| None).unwrap_or_else(|e| panic!("{name}: {e}"));
            let plan = compile(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!plan.vertices.is_empty());
        }
        let process = compile(&substitute_env(include_str!("../specs/process.toml"), |_| None).unwrap()).unwrap();
        let enriched = process.operators.iter().find(|o| o.name == "enriched").unwrap();
        let names: Vec<_> = enriched.schema.fields.iter().map(|f| f.name.as_str()).collect();
        assert!(names.contains(&"engagement_pct") && names.contains(&"slug"), "{names:?}");
    }

    /// The same spec plans to the same fingerprint every time; another parallelism (or any other
    /// change of the plan) to another.
    #[test]
    fn a_plan_fingerprint_is_stable_and_tells_plans_apart() {
        let text = substitute_env(include_str!("../specs/process.toml"), |_| None).unwrap();
        let one = crate::compile_with_parallelism(&text, None).unwrap();
        assert_eq!(one.fingerprint(), crate::compile_with_parallelism(&text, None).unwrap().fingerprint());
        assert_ne!(one.fingerprint(), crate::compile_with_parallelism(&text, Some(3)).unwrap().fingerprint());
    }

    /// `eddy rescale JOB 2` on each shipped spec plans, and the stages that must run as one task
    /// (the Redis sink) stay at one; the CDC source rescales (its extra subtasks read snapshot
    /// chunks, then idle).
    #[test]
    fn shipped_specs_rescale_with_single_task_stages_kept() {
        let specs = [
            ("ingest", include_str!("../specs/ingest.toml")),
            ("process", include_str!("../specs/process.toml")),
            ("hop-sum", include_str!("../specs/hop-sum.toml")),
        ];
        for (name, text) in specs {
            let text = substitute_env(text, |_| None).unwrap();
            let plan = crate::compile_with_parallelism(&text, Some(2)).unwrap_or_else(|e| panic!("{name}: {e}"));
            for o in &plan.operators {
                let single = match &o.kind {
                    super::OperatorKind::Source { connector, .. } => connector.capabilities().single_instance,
                    super::OperatorKind::Sink { connector } => connector.capabilities().single_instance,
                    _ => None,
                };
                if single.is_some() {
                    assert_eq!(o.parallelism, 1, "{name}: {}", o.name);
                }
            }
        }
        let ingest = substitute_env(include_str!("../specs/ingest.toml"), |_| None).unwrap();
        let two = ingest.replace("connector = \"postgres_cdc\"", "connector = \"postgres_cdc\"\nparallelism = 2");
        assert_eq!(compile(&two).unwrap().operators[0].parallelism, 2);
    }

    /// The shipped lookup reads a changelog: it remembers what it joined per event id, for the
    /// source's `state_ttl` on the event time; at another parallelism its input is spread by id.
    #[test]
    fn a_lookup_over_a_changelog_remembers_per_row_key() {
        let text = substitute_env(include_str!("../specs/process.toml"), |_| None).unwrap();
        let memory = |plan: &super::Plan| {
            let op = plan.operators.iter().find(|o| o.name == "with_content").unwrap();
            match &op.kind {
                super::OperatorKind::Lookup { remember, .. } => remember.clone(),
                _ => unreachable!(),
            }
        };
        let plan = compile(&text).unwrap();
        let m = memory(&plan).expect("the lookup reads an upsert changelog");
        let events = &plan.operators.iter().find(|o| o.name == "events").unwrap().schema;
        assert_eq!(m.key, vec![events.index_of("id").unwrap()]);
        assert_eq!(m.time, events.index_of("event_ts"));
        assert_eq!((m.ttl_ms, m.keyed), (Some(3_600_000), false));
        let wider = text.replace("on = \"content_id\"", "on = \"content_id\"\nparallelism = 3");
        let m = memory(&compile(&wider).unwrap()).unwrap();
        assert!(m.keyed, "rows of one key must meet in one lookup subtask");
        let append_only = text
            .replace("format = \"upsert-json\"", "format = \"json\"")
            .replace("state_ttl = \"1h\"", "")
            .replace("version_column = \"version\"\nheartbeats", "heartbeats");
        let plan = compile(&append_only).unwrap();
        assert_eq!(memory(&plan), None);
    }

    /// The Kafka source's `state_ttl` is read and checked at submit time, the option named.
    #[test]
    fn a_bad_state_ttl_is_refused() {
        let text = substitute_env(include_str!("../specs/process.toml"), |_| None).unwrap();
        for (bad, says) in [("\"soon\"", "bad duration"), ("\"0s\"", "must be positive"), ("5", "invalid type")] {
            let e = compile(&text.replace("state_ttl = \"1h\"", &format!("state_ttl = {bad}"))).unwrap_err().to_string();
            assert!(e.contains("source[events].options.state_ttl") && e.contains(says), "{bad}: {e}");
        }
        let json = text.replace("format = \"upsert-json\"", "format = \"json\"");
        let e = compile(&json).unwrap_err().to_string();
        assert!(e.contains("options.state_ttl: only the upsert-json format"), "{e}");
        // Shorter than the 10-minute window (plus its 2 s delay): replays would count twice.
        let short = text.replace("state_ttl = \"1h\"", "state_ttl = \"10m\"");
        let e = compile(&short).unwrap_err().to_string();
        assert!(e.contains("source[events].options.state_ttl") && e.contains("engagement_10m") && e.contains("602000 ms"), "{e}");
    }
}

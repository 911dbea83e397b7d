//! The IoT Hub query language for device and module twins, as pure logic: no I/O, no locking.
//! `POST /devices/query` parses the text once, then feeds twin JSON rows (the `GET /twins/{id}`
//! shape, `shared/protocol.md` D) through [`Query::matches`] and [`Query::project`], or, for
//! `COUNT()`/`GROUP BY` queries, all matching rows at once through [`Query::aggregate`].
//!
//! Reference: Microsoft, "IoT Hub query language for device and module twins, jobs, and message
//! routing" (`iot-hub-devguide-query-language`) and its companion "Queries for IoT Hub device
//! and module twins" (`query-twins`). Every example query from both is a unit test in this
//! module.
//!
//! # Pipeline
//! Modelled on Azurite's OData query interpreter (`shared/STYLE.md` §5), each stage with its
//! own tests:
//! 1. `lexer`: text → tokens with 0-based character positions.
//! 2. `parser`: recursive descent → the `ast` types, plus the semantic checks (known
//!    functions and arities, aggregates only in SELECT, SELECT consistent with GROUP BY,
//!    nesting ≤ 64 levels, text ≤ 8192 characters).
//! 3. `eval` and `functions`: the AST against JSON rows, with undefined-value semantics. A
//!    condition can also read a stored twin in place through [`Row`] ([`RowPlan::admits`]), so
//!    a scan builds rows only for the twins that match.
//!
//! # Grammar (EBNF; keywords case-insensitive)
//! ```text
//! query       = "SELECT" ["TOP" integer] select_list "FROM" source
//!               ["WHERE" expr] ["GROUP" "BY" path {"," path}] ;
//! select_list = "*" | select_item {"," select_item} ;
//! select_item = (aggregate | expr) ["AS" name] ;
//! aggregate   = "COUNT" "(" ")" | ("AVG" | "SUM" | "MIN" | "MAX") "(" expr ")" ;
//! source      = "devices" | "devices" "." "modules" ;
//! expr        = and_expr {"OR" and_expr} ;
//! and_expr    = not_expr {"AND" not_expr} ;
//! not_expr    = "NOT" not_expr | comparison ;
//! comparison  = additive [cmp_op additive | ["NOT"] ("IN" | "NIN") list] ;
//! cmp_op      = "=" | "!=" | "<>" | "<" | ">" | "<=" | ">=" ;
//! list        = "[" [expr {"," expr}] "]" | "(" [expr {"," expr}] ")" ;
//! additive    = multiplicative {("+" | "-") multiplicative} ;
//! multiplicative = unary {("*" | "/" | "%") unary} ;
//! unary       = ("-" | "+") unary | primary ;
//! primary     = number | string | "true" | "false" | "null" | "undefined"
//!             | function_name "(" [expr {"," expr}] ")"
//!             | "[" [expr {"," expr}] "]" | "(" expr ")" | path ;
//! path        = name {"." (name | keyword | digits)} ;
//! name        = identifier | "[[" text "]]" ;
//! ```
//! Identifiers may contain `$` (`properties.reported.$version`); `[[group]]` escapes a name
//! that is a keyword. Numbers are decimal or `0x` hexadecimal; strings use single or double
//! quotes with `\'`, `\"`, `\\` and `\uXXXX` escapes.
//!
//! # Results
//! - `SELECT *` yields the row itself. A projection yields an object with one key per item
//!   that is defined for the row: the alias, or for a plain path the key it resolved to
//!   (`SELECT DeviceId` → `"deviceId"`, as the article's example output shows), or `$1`, `$2`,
//!   … for other unaliased items (Cosmos DB's convention; the article does not say).
//! - Aggregates yield one object per group, in order of first appearance; without GROUP BY
//!   exactly one object, so `SELECT COUNT() AS n FROM devices` over no rows gives `{"n": 0}`.
//! - `TOP n` caps the number of result items. For plain queries the caller applies it
//!   ([`Query::top`]); [`Query::aggregate`] applies it itself.

mod ast;
mod eval;
mod functions;
mod lexer;
mod parser;

use crate::twin::RowShape;
pub use ast::{Query, Source};
pub use eval::{value_in, Row};

/// Every property path in an expression.
fn collect_paths<'a>(expr: &'a ast::Expr, out: &mut Vec<&'a ast::Path>) {
    use ast::Expr;
    match expr {
        Expr::Const(_) => {}
        Expr::Path(p) => out.push(p),
        Expr::Not(e) | Expr::Neg(e) => collect_paths(e, out),
        Expr::Array(items) | Expr::And(items) | Expr::Or(items) | Expr::Call(_, items) => {
            items.iter().for_each(|e| collect_paths(e, out));
        }
        Expr::Compare(_, a, b) => {
            collect_paths(a, out);
            collect_paths(b, out);
        }
        Expr::Arith(first, rest) => {
            collect_paths(first, out);
            rest.iter().for_each(|(_, e)| collect_paths(e, out));
        }
        Expr::In { expr, list, .. } => {
            collect_paths(expr, out);
            list.iter().for_each(|e| collect_paths(e, out));
        }
    }
}

/// The row parts that `paths` can reach. Names match case-insensitively, as the evaluator's
/// fallback does.
fn shape_of(paths: &[&ast::Path]) -> RowShape {
    let root = |p: &ast::Path| p.0.first().map(|s| s.to_ascii_lowercase());
    let under_properties: Vec<&ast::Path> = paths
        .iter()
        .copied()
        .filter(|p| root(p).as_deref() == Some("properties"))
        .collect();
    RowShape {
        identity: paths
            .iter()
            .any(|p| !matches!(root(p).as_deref(), Some("tags" | "properties"))),
        tags: paths.iter().any(|p| root(p).as_deref() == Some("tags")),
        properties: !under_properties.is_empty(),
        // `$metadata` is in the row for a path that names it, and for one that reads a whole
        // section (`properties.reported`) or all properties: their value includes it.
        metadata: under_properties
            .iter()
            .any(|p| p.0.len() <= 2 || p.0.iter().any(|s| s.eq_ignore_ascii_case("$metadata"))),
    }
}

/// How a scan over twins reads them for one query: the WHERE clause, which the scan checks on
/// each stored twin in place (through [`Row`]) before it builds anything, and the parts of the
/// row to build for the twins that pass.
#[derive(Debug, Clone, Copy)]
pub struct RowPlan<'q> {
    pub shape: RowShape,
    filter: Option<&'q ast::Expr>,
}

impl RowPlan<'_> {
    /// Every twin, rows of `shape`.
    pub fn all(shape: RowShape) -> RowPlan<'static> {
        RowPlan {
            shape,
            filter: None,
        }
    }

    /// Whether a twin passes the WHERE clause. `twin` must answer as the twin's row of
    /// `self.shape` would: with `$metadata` in the property sections only when
    /// `self.shape.metadata` is set.
    pub fn admits<R: Row + ?Sized>(&self, twin: &R) -> bool {
        eval::passes(self.filter, twin)
    }
}

pub use parser::{MAX_NESTING, MAX_QUERY_CHARS};

use serde_json::Value;

/// A query that cannot be run: a syntax error, or a semantic one (unknown source or function,
/// wrong argument count, SELECT list inconsistent with GROUP BY, too long or too deep).
/// `position` is the 0-based character offset the problem was found at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("Syntax error at position {position}: {message}")]
pub struct QueryError {
    pub position: usize,
    pub message: String,
}

impl QueryError {
    pub(crate) fn new(position: usize, message: impl Into<String>) -> QueryError {
        QueryError {
            position,
            message: message.into(),
        }
    }
}

/// Parses a query (see the module doc for the grammar).
pub fn parse(text: &str) -> Result<Query, QueryError> {
    parser::parse(text)
}

/// A message-routing condition (Microsoft, "IoT Hub message routing query syntax"): one
/// expression of the query language, true or not for a message. The caller supplies the row:
/// application properties by name, system properties as `$contentType` …, `$body.…` and
/// `$twin.…`.
#[derive(Debug, Clone)]
pub struct Condition {
    expr: ast::Expr,
}

impl Condition {
    /// Parses a condition; the same lexer and expression grammar as a query's WHERE clause.
    pub fn parse(text: &str) -> Result<Condition, QueryError> {
        Ok(Condition {
            expr: parser::parse_condition(text)?,
        })
    }

    /// Whether the condition is exactly `true` for `row` (null, undefined or any other value
    /// is false, as for routes).
    pub fn matches<R: Row + ?Sized>(&self, row: &R) -> bool {
        eval::passes(Some(&self.expr), row)
    }
}

impl Query {
    /// The collection named in FROM.
    pub fn source(&self) -> Source {
        self.source
    }

    /// `SELECT *`: results are whole twins (`x-ms-item-type: twin`), not projections.
    pub fn is_select_star(&self) -> bool {
        matches!(self.select, ast::Select::All)
    }

    /// A scan that checks the WHERE clause and builds rows with only the parts it reads.
    pub fn filter_shape(&self) -> RowPlan<'_> {
        let mut paths = Vec::new();
        if let Some(f) = &self.filter {
            collect_paths(f, &mut paths);
        }
        self.plan(shape_of(&paths))
    }

    /// A scan that checks the WHERE clause and builds rows with the parts the query reads
    /// anywhere (WHERE, SELECT, GROUP BY); the whole row for `SELECT *`.
    pub fn row_shape(&self) -> RowPlan<'_> {
        self.plan(self.read_shape())
    }

    fn plan(&self, shape: RowShape) -> RowPlan<'_> {
        RowPlan {
            shape,
            filter: self.filter.as_ref(),
        }
    }

    /// The parts of a twin row the query reads anywhere.
    fn read_shape(&self) -> RowShape {
        let ast::Select::Items(items) = &self.select else {
            return RowShape::FULL;
        };
        let mut paths: Vec<&ast::Path> = self.group_by.iter().collect();
        if let Some(f) = &self.filter {
            collect_paths(f, &mut paths);
        }
        for item in items {
            match &item.kind {
                ast::ItemKind::Expr(e) => collect_paths(e, &mut paths),
                ast::ItemKind::Aggregate(a) => match a {
                    ast::Aggregate::Count => {}
                    ast::Aggregate::Avg(e)
                    | ast::Aggregate::Sum(e)
                    | ast::Aggregate::Min(e)
                    | ast::Aggregate::Max(e) => collect_paths(e, &mut paths),
                },
            }
        }
        shape_of(&paths)
    }

    /// The TOP limit, if any.
    pub fn top(&self) -> Option<usize> {
        self.top
    }

    /// COUNT() or GROUP BY: results need all matching rows at once.
    pub fn is_aggregate(&self) -> bool {
        !self.group_by.is_empty()
            || matches!(&self.select, ast::Select::Items(items)
                if items.iter().any(|i| matches!(i.kind, ast::ItemKind::Aggregate(_))))
    }

    /// WHERE clause (true when there is none).
    pub fn matches(&self, row: &Value) -> bool {
        eval::matches(self, row)
    }

    /// The SELECT list applied to one row (non-aggregate queries); SELECT * returns the row.
    /// On an aggregate query this is the aggregate of that single row.
    pub fn project(&self, row: &Value) -> Value {
        eval::project(self, row)
    }

    /// Aggregate queries: the result items for all matching rows (caller filters with
    /// matches()), at most TOP of them. On a non-aggregate query, the projected rows.
    pub fn aggregate<'a>(&self, rows: impl Iterator<Item = &'a Value>) -> Vec<Value> {
        eval::aggregate(self, rows)
    }
}

#[cfg(test)]
mod shape_tests {
    use super::*;

    #[test]
    fn rows_are_only_as_heavy_as_the_query_reads() {
        let q = parse("SELECT * FROM devices WHERE tags.x = 'y'").unwrap();
        assert_eq!(
            q.filter_shape().shape,
            RowShape {
                identity: false,
                tags: true,
                properties: false,
                metadata: false
            }
        );
        assert_eq!(q.row_shape().shape, RowShape::FULL);
        let q = parse(
            "SELECT DeviceId FROM devices WHERE properties.reported.$metadata.fw.$lastUpdated > '2020'",
        )
        .unwrap();
        assert_eq!(
            q.row_shape().shape,
            RowShape {
                identity: true,
                tags: false,
                properties: true,
                metadata: true
            }
        );
        // A whole section's value includes its `$metadata`; one property's does not.
        for (text, metadata) in [
            ("SELECT properties.reported FROM devices", true),
            ("SELECT * FROM devices WHERE is_object(properties)", true),
            (
                "SELECT * FROM devices WHERE properties.reported.fw = '1'",
                false,
            ),
        ] {
            let q = parse(text).unwrap();
            let plan = if q.is_select_star() {
                q.filter_shape()
            } else {
                q.row_shape()
            };
            assert_eq!(plan.shape.metadata, metadata, "{text}");
        }
        let q = parse("SELECT COUNT() AS n FROM devices.modules GROUP BY tags.site").unwrap();
        assert_eq!(
            q.row_shape().shape,
            RowShape {
                identity: false,
                tags: true,
                properties: false,
                metadata: false
            }
        );
    }
}

#[cfg(test)]
mod tests {
    //! Every example query in Microsoft's "IoT Hub query language for device and module twins,
    //! jobs, and message routing" (current revision, plus the 2018 revision's projection and
    //! module examples) and "Queries for IoT Hub device and module twins", run the way
    //! `POST /devices/query` runs them; then robustness against garbage input.

    use super::*;
    use serde_json::json;

    /// The articles' sample twin (`myDeviceId`) in the emulator's full twin shape.
    fn twin(id: &str, region: &str, status: &str, frequency: u64, connectivity: Value) -> Value {
        json!({
            "deviceId": id,
            "etag": "AAAAAAAAAAc=",
            "deviceEtag": "NzA2NTg0MjE=",
            "status": "enabled",
            "statusReason": null,
            "statusUpdateTime": "0001-01-01T00:00:00Z",
            "connectionState": "Disconnected",
            "lastActivityTime": "2021-05-07T00:50:38.0543092Z",
            "cloudToDeviceMessageCount": 0,
            "authenticationType": "sas",
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "modelId": "",
            "version": 2,
            "capabilities": {"iotEdge": false},
            "tags": {"location": {"region": region, "plant": "Redmond43"}},
            "properties": {
                "desired": {
                    "telemetryConfig": {
                        "configId": "db00ebf5-eeeb-42be-86a1-458cccb69e57",
                        "sendFrequencyInSecs": frequency
                    },
                    "$metadata": {"$lastUpdated": "2024-01-01T00:00:00.0000000Z"},
                    "$version": 4
                },
                "reported": {
                    "connectivity": connectivity,
                    "telemetryConfig": {
                        "configId": "db00ebf5-eeeb-42be-86a1-458cccb69e57",
                        "sendFrequencyInSecs": frequency,
                        "status": status
                    },
                    "$metadata": {"$lastUpdated": "2024-01-01T00:00:00.0000000Z"},
                    "$version": 7
                }
            }
        })
    }

    /// Six devices: three `Success`, two `Pending`, one `Error`, as in the GROUP BY example.
    fn devices() -> Vec<Value> {
        vec![
            twin(
                "myDeviceId",
                "US",
                "Success",
                300,
                json!({"type": "cellular"}),
            ),
            twin("wired1", "US", "Pending", 30, json!("wired")),
            twin("wifi1", "EU", "Success", 60, json!("wifi")),
            {
                let mut t = twin("AZ3166Device", "US", "Error", 600, json!("wifi"));
                t["connectionState"] = json!("Connected");
                t
            },
            twin("cell2", "EU", "Pending", 300, json!("cellular")),
            {
                let mut t = twin("bare", "US", "Success", 120, Value::Null);
                t["properties"]["reported"]
                    .as_object_mut()
                    .unwrap()
                    .remove("connectivity");
                t["tags"]["group"] = json!({"name": "some_value"});
                t
            },
        ]
    }

    fn module(device: &str, module: &str, status: &str) -> Value {
        let mut t = twin(device, "US", "Success", 60, json!("wifi"));
        let o = t.as_object_mut().unwrap();
        o.remove("capabilities");
        o.insert("moduleId".into(), json!(module));
        t["properties"]["reported"]["status"] = json!(status);
        t
    }

    fn modules() -> Vec<Value> {
        vec![
            module("device1", "scanner", "scanning"),
            module("device2", "scanner", "idle"),
            module("device3", "scanner", "scanning"),
            module("device2", "other", "scanning"),
        ]
    }

    /// Runs a query the way the HTTP side does: filter, then aggregate or project, then TOP.
    fn run(text: &str) -> Vec<Value> {
        let query = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let rows = match query.source() {
            Source::Devices => devices(),
            Source::Modules => modules(),
        };
        let matching = rows.iter().filter(|r| query.matches(r));
        if query.is_aggregate() {
            query.aggregate(matching)
        } else {
            matching
                .take(query.top().unwrap_or(usize::MAX))
                .map(|r| query.project(r))
                .collect()
        }
    }

    fn ids(results: &[Value]) -> Vec<&str> {
        results
            .iter()
            .map(|r| r["deviceId"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn doc_select_star_from_devices_returns_every_twin_whole() {
        // "SELECT *" (SELECT clause) and "SELECT * FROM devices" (FROM clause, examples).
        assert_eq!(run("SELECT * FROM devices"), devices());
    }

    #[test]
    fn doc_select_specific_properties() {
        // SELECT clause example "SELECT DeviceID, LastActivityTime", completed with FROM.
        let results = run("SELECT DeviceID, LastActivityTime FROM devices");
        assert_eq!(results.len(), 6);
        assert_eq!(
            results[0],
            json!({"deviceId": "myDeviceId", "lastActivityTime": "2021-05-07T00:50:38.0543092Z"})
        );
    }

    #[test]
    fn doc_select_count_as_total_number() {
        // SELECT clause example "SELECT COUNT() as TotalNumber", completed with FROM.
        assert_eq!(
            run("SELECT COUNT() as TotalNumber FROM devices"),
            vec![json!({"TotalNumber": 6})]
        );
        // query-twins: "SELECT COUNT() as totalNumberOfDevices FROM devices".
        assert_eq!(
            run("SELECT COUNT() as totalNumberOfDevices FROM devices"),
            vec![json!({"totalNumberOfDevices": 6})]
        );
    }

    #[test]
    fn doc_group_by_telemetry_status() {
        // GROUP BY clause example and its documented result shape.
        let results = run(
            "SELECT properties.reported.telemetryConfig.status AS status,
    COUNT() AS numberOfDevices
  FROM devices
  GROUP BY properties.reported.telemetryConfig.status",
        );
        assert_eq!(
            results,
            vec![
                json!({"status": "Success", "numberOfDevices": 3}),
                json!({"status": "Pending", "numberOfDevices": 2}),
                json!({"status": "Error", "numberOfDevices": 1}),
            ]
        );
    }

    #[test]
    fn doc_group_keyword_escaped_with_double_brackets() {
        // GROUP BY caution: "SELECT * FROM devices WHERE tags.[[group]].name = 'some_value'".
        assert_eq!(
            ids(&run(
                "SELECT * FROM devices WHERE tags.[[group]].name = 'some_value'"
            )),
            ["bare"]
        );
    }

    #[test]
    fn doc_jobs_queries_are_reported_as_unsupported() {
        // WHERE clause example and the 2018 jobs examples: devices.jobs is out of scope.
        for text in [
            "SELECT * FROM devices.jobs\n    WHERE devices.jobs.deviceId = 'myDeviceId'",
            "SELECT * FROM devices.jobs
  WHERE devices.jobs.deviceId = 'myDeviceId'
    AND devices.jobs.jobType = 'scheduleTwinUpdate'
    AND devices.jobs.status = 'completed'
    AND devices.jobs.createdTimeUtc > '2016-09-01'",
            "SELECT * FROM devices.jobs\n  WHERE devices.jobs.jobId = 'myJobId'",
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.position, 14, "{text}");
            assert!(e.message.contains("devices.jobs is not supported"), "{e}");
        }
    }

    #[test]
    fn doc_filter_by_tag() {
        assert_eq!(
            ids(&run(
                "SELECT * FROM devices\nWHERE tags.location.region = 'US'"
            )),
            ["myDeviceId", "wired1", "AZ3166Device", "bare"]
        );
    }

    #[test]
    fn doc_filter_by_tag_and_reported_frequency() {
        let text = "SELECT * FROM devices
  WHERE tags.location.region = 'US'
    AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60";
        assert_eq!(ids(&run(text)), ["myDeviceId", "AZ3166Device", "bare"]);
    }

    #[test]
    fn doc_filter_with_in_array_constant() {
        let text =
            "SELECT * FROM devices\n  WHERE properties.reported.connectivity IN ['wired', 'wifi']";
        // myDeviceId's connectivity is an object, so it does not match.
        assert_eq!(ids(&run(text)), ["wired1", "wifi1", "AZ3166Device"]);
        let text =
            "SELECT * FROM devices WHERE properties.reported.connectivity NIN ['wired', 'wifi']";
        assert_eq!(ids(&run(text)), ["myDeviceId", "cell2"]);
    }

    #[test]
    fn doc_filter_with_is_defined() {
        let text = "SELECT * FROM devices\n  WHERE is_defined(properties.reported.connectivity)";
        assert_eq!(
            ids(&run(text)),
            ["myDeviceId", "wired1", "wifi1", "AZ3166Device", "cell2"]
        );
    }

    #[test]
    fn doc_projection_of_enabled_disconnected_devices() {
        // query-twins: the query and its documented result shape.
        let results = run("SELECT DeviceId, LastActivityTime FROM devices WHERE status = 'enabled' AND connectionState = 'Disconnected'");
        assert_eq!(results.len(), 5);
        let results = run(
            "SELECT DeviceId, LastActivityTime FROM devices WHERE connectionState = 'Connected'",
        );
        assert_eq!(
            results,
            vec![
                json!({"deviceId": "AZ3166Device", "lastActivityTime": "2021-05-07T00:50:38.0543092Z"})
            ]
        );
        // 2018 revision: "SELECT LastActivityTime FROM devices WHERE status = 'enabled'".
        let results = run("SELECT LastActivityTime FROM devices WHERE status = 'enabled'");
        assert_eq!(
            results[0],
            json!({"lastActivityTime": "2021-05-07T00:50:38.0543092Z"})
        );
    }

    #[test]
    fn doc_module_twin_queries() {
        assert_eq!(run("SELECT * FROM devices.modules"), modules());
        let scanning =
            run("SELECT * FROM devices.modules WHERE properties.reported.status = 'scanning'");
        assert_eq!(ids(&scanning), ["device1", "device3", "device2"]);
        let subset = run("SELECT * FROM devices.modules
  WHERE properties.reported.status = 'scanning'
  AND deviceId IN ['device1', 'device2']");
        assert_eq!(ids(&subset), ["device1", "device2"]);
        assert_eq!(subset[1]["moduleId"], "other");
        // The 2018 revision wrote the keywords in lower case.
        let lower = run("Select * from devices.modules \n  where properties.reported.status = 'scanning' \n  and deviceId IN ['device1', 'device2']");
        assert_eq!(lower, subset);
    }

    #[test]
    fn cli_queries_from_protocol_notes() {
        // shared/protocol.md E.2: the Azure CLI's queries.
        assert_eq!(run("select * from devices").len(), 6);
        assert!(run("select * from devices where capabilities.iotEdge = true").is_empty());
        assert_eq!(run("SELECT TOP 2 * FROM devices").len(), 2);
    }

    #[test]
    fn query_is_clone_and_debug_and_reports_its_shape() {
        let q = parse("SELECT TOP 3 deviceId FROM devices.modules").unwrap();
        let copy = q.clone();
        assert_eq!(copy, q);
        assert!(format!("{q:?}").contains("Modules"));
        assert_eq!(
            (q.source(), q.top(), q.is_aggregate()),
            (Source::Modules, Some(3), false)
        );
        assert!(parse("SELECT status FROM devices GROUP BY status")
            .unwrap()
            .is_aggregate());
        assert!(parse("SELECT MAX(version) AS v FROM devices")
            .unwrap()
            .is_aggregate());
        assert!(!parse("SELECT * FROM devices").unwrap().is_aggregate());
    }

    /// Parses and, when that succeeds, evaluates every way the HTTP side can.
    fn exercise(text: &str, rows: &[Value]) {
        if let Ok(query) = parse(text) {
            for row in rows {
                let _ = query.matches(row);
                let _ = query.project(row);
            }
            let _ = query.aggregate(rows.iter());
        }
    }

    #[test]
    fn garbage_truncated_long_and_deep_input_never_panics() {
        let mut rows = devices();
        rows.extend(modules());
        rows.push(json!(null));
        rows.push(json!([1, 2]));
        rows.push(json!("text"));

        let valid = [
            "SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60",
            "SELECT TOP 5 deviceId, properties.reported.$version AS v FROM devices.modules WHERE deviceId NIN ('a', \"b\") OR NOT is_defined(tags.x)",
            "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS n, AVG(version) FROM devices GROUP BY properties.reported.telemetryConfig.status",
            "SELECT * FROM devices WHERE SUBSTRING(CONCAT(deviceId, 'x'), 1, 2) = 'yD' AND tags.[[group]].name IN [-1, 0x1F, 2.5e3, null, true, undefined]",
            "SELECT * FROM devices WHERE 'é\\u00e9\\'' <> LOWER(deviceId) AND (version + 1) * 2 % 3 / 4 - 5 > -6",
        ];
        let mut inputs: Vec<String> = Vec::new();
        for q in valid {
            let chars: Vec<char> = q.chars().collect();
            for end in 0..=chars.len() {
                inputs.push(chars[..end].iter().collect());
                inputs.push(chars[end..].iter().collect());
            }
        }
        // Deterministic pseudo-random token soup.
        let alphabet = [
            "SELECT",
            "TOP",
            "*",
            "FROM",
            "devices",
            ".",
            "modules",
            "jobs",
            "WHERE",
            "GROUP",
            "BY",
            "AS",
            "AND",
            "OR",
            "NOT",
            "IN",
            "NIN",
            "(",
            ")",
            "[",
            "]",
            "[[",
            "]]",
            ",",
            "=",
            "!=",
            "<>",
            "<",
            ">=",
            "+",
            "-",
            "/",
            "%",
            "'s'",
            "\"",
            "'",
            "\\",
            "1",
            "-2.5",
            "0x",
            "1e",
            "null",
            "true",
            "undefined",
            "COUNT",
            "COUNT()",
            "SUM",
            "is_defined",
            "concat",
            "tags",
            "$version",
            "é",
            "\u{0}",
            "#",
            "\n",
            " ",
        ];
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..3000 {
            let mut text = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
                if seed & 0x100 != 0 {
                    text.push(' ');
                }
            }
            inputs.push(text.clone());
            inputs.push(format!("SELECT * FROM devices WHERE {text}"));
            inputs.push(format!("SELECT {text} FROM devices"));
        }
        // Very long and very deep.
        let w = "SELECT * FROM devices WHERE ";
        inputs.push("x".repeat(100_000));
        inputs.push(format!("{w}deviceId = '{}'", "é".repeat(9000)));
        inputs.push(format!("{w}{}", "(".repeat(8_000)));
        inputs.push(format!("{w}{}1{}", "(".repeat(4_000), ")".repeat(4_000)));
        inputs.push(format!("{w}{}true", "NOT ".repeat(2_000)));
        inputs.push(format!("{w}{}1 = 1", "- ".repeat(4_000)));
        inputs.push(format!("{w}x IN {}", "[".repeat(8_000)));
        inputs.push(format!("{w}{}x{}", "abs(".repeat(1_000), ")".repeat(1_000)));
        inputs.push(format!("{w}{}", "[[".repeat(4_000)));
        inputs.push(format!("{w}1{}", " + 1".repeat(2_000)));
        inputs.push(format!("{w}a = 1{}", " OR a = 1".repeat(800)));
        inputs.push(format!("{w}a{}", ".b".repeat(4_000)));
        inputs.push(format!("SELECT {} FROM devices", "a, ".repeat(2_000)));
        inputs.push(format!("SELECT TOP {} * FROM devices", "9".repeat(40)));

        for text in &inputs {
            exercise(text, &rows);
        }
        // Deep input within the length limit is a nesting error, not a crash.
        for deep in &inputs[inputs.len() - 12..inputs.len() - 5] {
            assert!(deep.chars().count() <= MAX_QUERY_CHARS);
            let e = parse(deep).unwrap_err();
            assert!(e.message.contains("nested more than 64"), "{e}");
        }
    }
}

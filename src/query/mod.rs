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
//! 1. [`lexer`]: text → tokens with 0-based character positions.
//! 2. [`parser`]: recursive descent → the [`ast`] types, plus the semantic checks (known
//!    functions and arities, aggregates only in SELECT, SELECT consistent with GROUP BY,
//!    nesting ≤ 64 levels, text ≤ 8192 characters).
//! 3. `eval` and `functions`: the AST against JSON rows, with undefined-value semantics.
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

pub use ast::{Query, Source};
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

impl Query {
    /// The collection named in FROM.
    pub fn source(&self) -> Source {
        self.source
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

//! The syntax tree the parser builds and the evaluator walks, plus the function table.
//!
//! The tree stays shallow by construction: `AND`/`OR` chains and arithmetic chains are n-ary
//! nodes rather than left-leaning binary trees, so a long `a OR b OR c …` filter is one level
//! deep, and the only way to nest is through parentheses, `NOT`, unary minus, function
//! arguments and arrays, all of which the parser counts against its nesting limit. That keeps
//! both evaluation and `Drop` recursion bounded.

use super::QueryError;
use serde_json::Value;

/// The collection a query runs over (`FROM devices` or `FROM devices.modules`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `FROM devices`: device twins.
    Devices,
    /// `FROM devices.modules`: module twins.
    Modules,
}

/// A parsed query. Immutable; evaluate it with [`Query::matches`](crate::query::Query::matches)
/// and friends.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub(crate) top: Option<usize>,
    pub(crate) select: Select,
    pub(crate) source: Source,
    pub(crate) filter: Option<Expr>,
    pub(crate) group_by: Vec<Path>,
}

/// The SELECT list.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    /// `SELECT *`: the whole twin.
    All,
    /// `SELECT a, b AS c, COUNT() AS n`.
    Items(Vec<SelectItem>),
}

impl Select {
    /// SELECT list rules: with GROUP BY every plain item must be one of the grouped paths ("for
    /// each group, a row is generated as specified in the SELECT clause"); without GROUP BY,
    /// aggregates and per-row items cannot be mixed; output names must be unique.
    pub(crate) fn check(
        &self,
        positions: &[usize],
        group_by: &[Path],
        group_pos: usize,
    ) -> Result<(), QueryError> {
        let Select::Items(items) = self else {
            if !group_by.is_empty() {
                return Err(QueryError::new(
                    group_pos,
                    "SELECT * cannot be used with GROUP BY",
                ));
            }
            return Ok(());
        };
        let has_aggregate = items
            .iter()
            .any(|i| matches!(i.kind, ItemKind::Aggregate(_)));
        let mut names: Vec<String> = Vec::new();
        for (item, &pos) in items.iter().zip(positions) {
            if let ItemKind::Expr(expr) = &item.kind {
                if !group_by.is_empty() {
                    let grouped =
                        matches!(expr, Expr::Path(p) if group_by.iter().any(|g| g.same_as(p)));
                    if !grouped {
                        return Err(QueryError::new(
                            pos,
                            "a SELECT item must be a GROUP BY path or an aggregate",
                        ));
                    }
                } else if has_aggregate {
                    return Err(QueryError::new(
                        pos,
                        "cannot mix aggregates and per-row items without GROUP BY",
                    ));
                }
            }
            let name = match (&item.name, &item.kind) {
                (Some(name), _) => name.clone(),
                (None, ItemKind::Expr(Expr::Path(p))) => p.last().to_owned(),
                (None, _) => continue,
            };
            if names.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
                return Err(QueryError::new(
                    pos,
                    format!("duplicate name '{name}' in SELECT list"),
                ));
            }
            names.push(name);
        }
        Ok(())
    }
}

/// One element of the SELECT list.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectItem {
    pub kind: ItemKind,
    /// The key the item gets in result objects: its `AS` alias, or `$1`, `$2`, … for unnamed
    /// items that are not plain paths. `None` for an unaliased path, which takes the key it
    /// resolves to in the document (so `SELECT DeviceId` yields `deviceId`).
    pub name: Option<String>,
}

/// What one SELECT item computes.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemKind {
    /// A per-row expression (usually a property path).
    Expr(Expr),
    /// An aggregate over all rows of a group.
    Aggregate(Aggregate),
}

/// The aggregates of the SELECT grammar (`count()`, `avg()`, `sum()`, `min()`, `max()`).
#[derive(Debug, Clone, PartialEq)]
pub enum Aggregate {
    Count,
    Avg(Expr),
    Sum(Expr),
    Min(Expr),
    Max(Expr),
}

impl Aggregate {
    /// Parses an aggregate name, case-insensitively.
    pub fn is_name(name: &str) -> bool {
        ["COUNT", "AVG", "SUM", "MIN", "MAX"]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// A property path such as `properties.reported.$version`, one entry per segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Path(pub Vec<String>);

impl Path {
    /// Builds a path from a dotted string (test convenience; no bracket syntax).
    #[cfg(test)]
    pub fn dotted(s: &str) -> Path {
        Path(s.split('.').map(str::to_owned).collect())
    }

    /// Same path, ignoring ASCII case (property lookup is case-insensitive, see `eval`).
    pub fn same_as(&self, other: &Path) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
    }

    pub fn last(&self) -> &str {
        self.0.last().map_or("", String::as_str)
    }
}

/// Comparison operators (`<>` parses as `Ne`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// Arithmetic operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

/// An expression. `Const(None)` is the `undefined` constant.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Const(Option<Value>),
    Path(Path),
    /// `[e1, e2, …]`.
    Array(Vec<Expr>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    /// `first op1 e1 op2 e2 …`, folded left to right.
    Arith(Box<Expr>, Vec<(ArithOp, Expr)>),
    /// `expr IN [..]` (`negated` for `NIN` and `NOT IN`).
    In {
        expr: Box<Expr>,
        list: Vec<Expr>,
        negated: bool,
    },
    Call(Function, Vec<Expr>),
}

/// Built-in scalar functions. The query-language article lists `IS_DEFINED` for twin queries
/// and the rest for route conditions; the emulator accepts all of them everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    // Type checking and casting.
    IsDefined,
    IsNull,
    IsBool,
    IsNumber,
    IsString,
    IsObject,
    IsArray,
    IsPrimitive,
    AsNumber,
    // Math.
    Abs,
    Ceiling,
    Exp,
    Floor,
    Log,
    Log10,
    Power,
    Square,
    Sign,
    Sqrt,
    // Strings and arrays.
    Concat,
    Length,
    Lower,
    Upper,
    Ltrim,
    Rtrim,
    Replace,
    Reverse,
    Substring,
    IndexOf,
    StartsWith,
    EndsWith,
    Contains,
    ArrayContains,
}

/// Name (as written in queries, matched case-insensitively), function, and argument count range.
const FUNCTIONS: &[(&str, Function, usize, usize)] = &[
    ("IS_DEFINED", Function::IsDefined, 1, 1),
    ("IS_NULL", Function::IsNull, 1, 1),
    ("IS_BOOL", Function::IsBool, 1, 1),
    ("IS_NUMBER", Function::IsNumber, 1, 1),
    ("IS_STRING", Function::IsString, 1, 1),
    ("IS_OBJECT", Function::IsObject, 1, 1),
    ("IS_ARRAY", Function::IsArray, 1, 1),
    ("IS_PRIMITIVE", Function::IsPrimitive, 1, 1),
    ("AS_NUMBER", Function::AsNumber, 1, 1),
    ("ABS", Function::Abs, 1, 1),
    ("CEILING", Function::Ceiling, 1, 1),
    ("EXP", Function::Exp, 1, 1),
    ("FLOOR", Function::Floor, 1, 1),
    ("LOG", Function::Log, 1, 2),
    ("LOG10", Function::Log10, 1, 1),
    ("POWER", Function::Power, 2, 2),
    ("SQUARE", Function::Square, 1, 1),
    ("SIGN", Function::Sign, 1, 1),
    ("SQRT", Function::Sqrt, 1, 1),
    ("CONCAT", Function::Concat, 2, usize::MAX),
    ("LENGTH", Function::Length, 1, 1),
    ("LOWER", Function::Lower, 1, 1),
    ("UPPER", Function::Upper, 1, 1),
    ("LTRIM", Function::Ltrim, 1, 1),
    ("RTRIM", Function::Rtrim, 1, 1),
    ("REPLACE", Function::Replace, 3, 3),
    ("REVERSE", Function::Reverse, 1, 1),
    ("SUBSTRING", Function::Substring, 2, 3),
    ("INDEX_OF", Function::IndexOf, 2, 2),
    // The current article spells these STARTSWITH/ENDSWITH; older revisions (2018) wrote
    // STARTS_WITH/ENDS_WITH. Both are accepted.
    ("STARTSWITH", Function::StartsWith, 2, 2),
    ("STARTS_WITH", Function::StartsWith, 2, 2),
    ("ENDSWITH", Function::EndsWith, 2, 2),
    ("ENDS_WITH", Function::EndsWith, 2, 2),
    ("CONTAINS", Function::Contains, 2, 2),
    ("ARRAY_CONTAINS", Function::ArrayContains, 2, 3),
];

impl Function {
    /// Looks a function up by name, case-insensitively: `(function, min args, max args)`.
    pub fn lookup(name: &str) -> Option<(Function, usize, usize)> {
        FUNCTIONS
            .iter()
            .find(|(n, ..)| n.eq_ignore_ascii_case(name))
            .map(|&(_, f, min, max)| (f, min, max))
    }
}

impl Function {
    /// The message for a call to `name` with `found` arguments outside `min..=max`.
    pub fn arity_error(name: &str, min: usize, max: usize, found: usize) -> String {
        let wanted = match (min, max) {
            (a, b) if a == b => format!("{a}"),
            (a, usize::MAX) => format!("at least {a}"),
            (a, b) => format!("{a} to {b}"),
        };
        let name = name.to_ascii_uppercase();
        format!("function {name} takes {wanted} argument(s), found {found}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_lookup_is_case_insensitive_and_knows_arity() {
        assert_eq!(
            Function::lookup("is_defined"),
            Some((Function::IsDefined, 1, 1))
        );
        assert_eq!(
            Function::lookup("StartsWith"),
            Some((Function::StartsWith, 2, 2))
        );
        assert_eq!(
            Function::lookup("starts_with"),
            Some((Function::StartsWith, 2, 2))
        );
        assert_eq!(
            Function::lookup("concat"),
            Some((Function::Concat, 2, usize::MAX))
        );
        assert_eq!(Function::lookup("nope"), None);
        assert_eq!(Function::lookup("COUNT"), None);
    }

    #[test]
    fn paths_compare_ignoring_case() {
        assert!(
            Path::dotted("properties.Reported.x").same_as(&Path::dotted("Properties.reported.X"))
        );
        assert!(!Path::dotted("a.b").same_as(&Path::dotted("a")));
        assert_eq!(Path::dotted("a.b.$version").last(), "$version");
        assert!(
            Aggregate::is_name("count") && Aggregate::is_name("Max") && !Aggregate::is_name("x")
        );
    }
}

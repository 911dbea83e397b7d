//! Recursive-descent parser: tokens → [`Query`]. One function per grammar rule of the EBNF in
//! the module doc (`query/mod.rs`), lowest precedence first: `OR`, `AND`, `NOT`, comparison /
//! `IN`, `+ -`, `* / %`, unary minus, primary.
//!
//! Besides syntax it checks what the evaluator relies on, so a parsed query always evaluates:
//! known functions with the right number of arguments, aggregates only as SELECT items, the
//! SELECT list consistent with GROUP BY, and nesting no deeper than [`MAX_NESTING`].

use super::ast::{
    Aggregate, ArithOp, CmpOp, Expr, Function, ItemKind, Path, Query, Select, SelectItem, Source,
};
use super::lexer::{tokenize, Keyword, Token, TokenKind};
use super::QueryError;
use serde_json::Value;

/// Longest accepted query, in characters. "Query expressions can have a maximum length of 8192
/// characters" (Microsoft, "Queries for IoT Hub device and module twins", limitations).
pub const MAX_QUERY_CHARS: usize = 8192;

/// Deepest nesting of parentheses, `NOT`, unary minus, function arguments and arrays. Keeps
/// parser and evaluator recursion bounded on hostile input.
pub const MAX_NESTING: usize = 64;

type Result<T> = std::result::Result<T, QueryError>;

/// Parses one query.
pub fn parse(text: &str) -> Result<Query> {
    if text.chars().count() > MAX_QUERY_CHARS {
        return Err(QueryError::new(
            MAX_QUERY_CHARS,
            format!("query is longer than {MAX_QUERY_CHARS} characters"),
        ));
    }
    let tokens = tokenize(text)?;
    Parser {
        tokens,
        pos: 0,
        nesting: 0,
    }
    .query()
}

/// Parses a bare condition (a message-routing query): one expression and nothing after it.
pub fn parse_condition(text: &str) -> Result<Expr> {
    if text.chars().count() > MAX_QUERY_CHARS {
        return Err(QueryError::new(
            MAX_QUERY_CHARS,
            format!("condition is longer than {MAX_QUERY_CHARS} characters"),
        ));
    }
    let mut parser = Parser {
        tokens: tokenize(text)?,
        pos: 0,
        nesting: 0,
    };
    let expr = parser.expr()?;
    if parser.peek().kind != TokenKind::Eof {
        return Err(parser.expected("an operator or end of condition"));
    }
    Ok(expr)
}

struct Parser {
    /// Always ends with `Eof`; `pos` never moves past it.
    tokens: Vec<Token>,
    pos: usize,
    nesting: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn peek_kind(&self, ahead: usize) -> &TokenKind {
        &self.tokens[(self.pos + ahead).min(self.tokens.len() - 1)].kind
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if token.kind != TokenKind::Eof {
            self.pos += 1;
        }
        token
    }

    fn is_kw(&self, kw: Keyword) -> bool {
        self.peek().kind == TokenKind::Keyword(kw)
    }

    fn eat_kw(&mut self, kw: Keyword) -> bool {
        let hit = self.is_kw(kw);
        if hit {
            self.advance();
        }
        hit
    }

    fn eat(&mut self, kind: &TokenKind) -> bool {
        let hit = self.peek().kind == *kind;
        if hit {
            self.advance();
        }
        hit
    }

    fn expected(&self, what: &str) -> QueryError {
        let token = self.peek();
        QueryError::new(
            token.pos,
            format!("expected {what}, found {}", token.describe()),
        )
    }

    fn expect(&mut self, kind: &TokenKind, what: &str) -> Result<()> {
        if self.eat(kind) {
            Ok(())
        } else {
            Err(self.expected(what))
        }
    }

    fn enter(&mut self) -> Result<()> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(QueryError::new(
                self.peek().pos,
                format!("expression nested more than {MAX_NESTING} levels deep"),
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.nesting -= 1;
    }

    // query = "SELECT" ["TOP" integer] select_list "FROM" source ["WHERE" expr]
    //         ["GROUP" "BY" path {"," path}] EOF
    fn query(&mut self) -> Result<Query> {
        if !self.eat_kw(Keyword::Select) {
            return Err(self.expected("SELECT"));
        }
        let top = if self.eat_kw(Keyword::Top) {
            Some(self.top_count()?)
        } else {
            None
        };
        let (select, positions) = self.select_list()?;
        if !self.eat_kw(Keyword::From) {
            return Err(self.expected("FROM"));
        }
        let source = self.source()?;
        let filter = if self.eat_kw(Keyword::Where) {
            Some(self.expr()?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        let group_pos = self.peek().pos;
        if self.eat_kw(Keyword::Group) {
            if !self.eat_kw(Keyword::By) {
                return Err(self.expected("BY"));
            }
            loop {
                group_by.push(self.group_path()?);
                if !self.eat(&TokenKind::Comma) {
                    break;
                }
            }
        }
        if self.peek().kind != TokenKind::Eof {
            return Err(self.expected(match (&filter, group_by.is_empty()) {
                (_, false) => "',' or end of query",
                (Some(_), true) => "an operator, GROUP BY or end of query",
                (None, true) => "WHERE, GROUP BY or end of query",
            }));
        }
        select.check(&positions, &group_by, group_pos)?;
        Ok(Query {
            top,
            select,
            source,
            filter,
            group_by,
        })
    }

    fn top_count(&mut self) -> Result<usize> {
        if let TokenKind::Number(n) = &self.peek().kind {
            if let Some(n) = n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                self.advance();
                return Ok(n);
            }
        }
        Err(self.expected("a non-negative integer after TOP"))
    }

    /// The SELECT list, with each item's start position (for error messages).
    fn select_list(&mut self) -> Result<(Select, Vec<usize>)> {
        if self.eat(&TokenKind::Star) {
            return Ok((Select::All, Vec::new()));
        }
        let (mut items, mut positions) = (Vec::new(), Vec::new());
        let mut unnamed = 0;
        loop {
            positions.push(self.peek().pos);
            let mut item = self.select_item()?;
            // Items that are neither aliased nor a plain path get Cosmos DB-style positional
            // names ($1, $2, …); the article only shows aliased aggregates.
            if item.name.is_none() && !matches!(item.kind, ItemKind::Expr(Expr::Path(_))) {
                unnamed += 1;
                item.name = Some(format!("${unnamed}"));
            }
            items.push(item);
            if !self.eat(&TokenKind::Comma) {
                return Ok((Select::Items(items), positions));
            }
        }
    }

    // select_item = (aggregate | expr) ["AS" name]
    fn select_item(&mut self) -> Result<SelectItem> {
        let kind = match (&self.peek().kind, self.peek_kind(1)) {
            (TokenKind::Ident(name), TokenKind::LParen) if Aggregate::is_name(name) => {
                ItemKind::Aggregate(self.aggregate()?)
            }
            _ => ItemKind::Expr(self.expr()?),
        };
        let name = if self.eat_kw(Keyword::As) {
            match self.peek().kind.clone() {
                TokenKind::Ident(name) | TokenKind::BracketIdent(name) => {
                    self.advance();
                    Some(name)
                }
                _ => return Err(self.expected("an alias name after AS")),
            }
        } else {
            None
        };
        Ok(SelectItem { kind, name })
    }

    // aggregate = "COUNT" "(" ")" | ("AVG" | "SUM" | "MIN" | "MAX") "(" expr ")"
    fn aggregate(&mut self) -> Result<Aggregate> {
        let name = self.advance().text.to_ascii_uppercase();
        self.advance(); // '('
        if name == "COUNT" {
            self.expect(&TokenKind::RParen, "')' (COUNT takes no arguments)")?;
            return Ok(Aggregate::Count);
        }
        let arg = self.expr()?;
        self.expect(&TokenKind::RParen, "')'")?;
        Ok(match name.as_str() {
            "AVG" => Aggregate::Avg(arg),
            "SUM" => Aggregate::Sum(arg),
            "MIN" => Aggregate::Min(arg),
            _ => Aggregate::Max(arg),
        })
    }

    // source = "devices" ["." ("modules" | "jobs")]
    fn source(&mut self) -> Result<Source> {
        let start = self.peek().pos;
        let is_word = |t: &Token, w: &str| matches!(&t.kind, TokenKind::Ident(s) if s.eq_ignore_ascii_case(w));
        if !is_word(self.peek(), "devices") {
            return Err(self.expected("devices or devices.modules"));
        }
        self.advance();
        if !self.eat(&TokenKind::Dot) {
            return Ok(Source::Devices);
        }
        if is_word(self.peek(), "modules") {
            self.advance();
            return Ok(Source::Modules);
        }
        if is_word(self.peek(), "jobs") {
            // FROM devices.jobs is documented, but jobs are not part of this emulator.
            return Err(QueryError::new(
                start,
                "FROM devices.jobs is not supported by this emulator; use devices or devices.modules",
            ));
        }
        Err(self.expected("modules after 'devices.'"))
    }

    // group_path = name {"." name}   (the article: GROUP BY takes attribute names only)
    fn group_path(&mut self) -> Result<Path> {
        match self.peek().kind.clone() {
            TokenKind::Ident(name) | TokenKind::BracketIdent(name) => {
                self.advance();
                self.path(name)
            }
            _ => Err(self.expected("a property path")),
        }
    }

    // expr = or_expr
    fn expr(&mut self) -> Result<Expr> {
        self.enter()?;
        let expr = self.or_expr();
        self.leave();
        expr
    }

    // or_expr = and_expr {"OR" and_expr}
    fn or_expr(&mut self) -> Result<Expr> {
        let mut terms = vec![self.and_expr()?];
        while self.eat_kw(Keyword::Or) {
            terms.push(self.and_expr()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    // and_expr = not_expr {"AND" not_expr}
    fn and_expr(&mut self) -> Result<Expr> {
        let mut terms = vec![self.not_expr()?];
        while self.eat_kw(Keyword::And) {
            terms.push(self.not_expr()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    // not_expr = "NOT" not_expr | comparison
    fn not_expr(&mut self) -> Result<Expr> {
        if !self.eat_kw(Keyword::Not) {
            return self.comparison();
        }
        self.enter()?;
        let inner = self.not_expr();
        self.leave();
        Ok(Expr::Not(Box::new(inner?)))
    }

    // comparison = additive [cmp_op additive | ["NOT"] ("IN" | "NIN") list]
    fn comparison(&mut self) -> Result<Expr> {
        let left = self.additive()?;
        let op = match self.peek().kind {
            TokenKind::Eq => CmpOp::Eq,
            TokenKind::Ne => CmpOp::Ne,
            TokenKind::Lt => CmpOp::Lt,
            TokenKind::Gt => CmpOp::Gt,
            TokenKind::Le => CmpOp::Le,
            TokenKind::Ge => CmpOp::Ge,
            TokenKind::Keyword(Keyword::In) | TokenKind::Keyword(Keyword::Nin) => {
                let negated = self.advance().kind == TokenKind::Keyword(Keyword::Nin);
                return self.in_list(left, negated);
            }
            TokenKind::Keyword(Keyword::Not)
                if *self.peek_kind(1) == TokenKind::Keyword(Keyword::In) =>
            {
                self.advance();
                self.advance();
                return self.in_list(left, true);
            }
            _ => return Ok(left),
        };
        self.advance();
        let right = self.additive()?;
        Ok(Expr::Compare(op, Box::new(left), Box::new(right)))
    }

    // list = "[" [expr {"," expr}] "]" | "(" expr {"," expr} ")"
    fn in_list(&mut self, left: Expr, negated: bool) -> Result<Expr> {
        let close = match self.peek().kind {
            TokenKind::LBracket => TokenKind::RBracket,
            TokenKind::LParen => TokenKind::RParen,
            _ => return Err(self.expected("'[' or '(' after IN")),
        };
        self.advance();
        let list = self.expr_list(&close)?;
        Ok(Expr::In {
            expr: Box::new(left),
            list,
            negated,
        })
    }

    /// Comma-separated expressions up to and including `close` (which may come at once).
    fn expr_list(&mut self, close: &TokenKind) -> Result<Vec<Expr>> {
        let mut items = Vec::new();
        if self.eat(close) {
            return Ok(items);
        }
        loop {
            items.push(self.expr()?);
            if self.eat(close) {
                return Ok(items);
            }
            if !self.eat(&TokenKind::Comma) {
                let close = if *close == TokenKind::RParen {
                    ")"
                } else {
                    "]"
                };
                return Err(self.expected(&format!("',' or '{close}'")));
            }
        }
    }

    // additive = multiplicative {("+" | "-") multiplicative}
    fn additive(&mut self) -> Result<Expr> {
        let first = self.multiplicative()?;
        let mut rest = Vec::new();
        loop {
            let op = match self.peek().kind {
                TokenKind::Plus => ArithOp::Add,
                TokenKind::Minus => ArithOp::Sub,
                _ => break,
            };
            self.advance();
            rest.push((op, self.multiplicative()?));
        }
        Ok(arith(first, rest))
    }

    // multiplicative = unary {("*" | "/" | "%") unary}
    fn multiplicative(&mut self) -> Result<Expr> {
        let first = self.unary()?;
        let mut rest = Vec::new();
        loop {
            let op = match self.peek().kind {
                TokenKind::Star => ArithOp::Mul,
                TokenKind::Slash => ArithOp::Div,
                TokenKind::Percent => ArithOp::Rem,
                _ => break,
            };
            self.advance();
            rest.push((op, self.unary()?));
        }
        Ok(arith(first, rest))
    }

    // unary = ("-" | "+") unary | primary
    fn unary(&mut self) -> Result<Expr> {
        let negate = match self.peek().kind {
            TokenKind::Minus => true,
            TokenKind::Plus => false,
            _ => return self.primary(),
        };
        self.advance();
        self.enter()?;
        let inner = self.unary();
        self.leave();
        let inner = inner?;
        if !negate {
            return Ok(inner);
        }
        // Fold `-<number>` into a constant so `IN [-1, 2]` holds plain constants.
        if let Expr::Const(Some(Value::Number(n))) = &inner {
            if let Some(v) = n.as_i64().and_then(i64::checked_neg) {
                return Ok(Expr::Const(Some(v.into())));
            }
            if let Some(v) = n.as_f64().and_then(|f| serde_json::Number::from_f64(-f)) {
                return Ok(Expr::Const(Some(Value::Number(v))));
            }
        }
        Ok(Expr::Neg(Box::new(inner)))
    }

    // primary = constant | path | call | array | "(" expr ")"
    fn primary(&mut self) -> Result<Expr> {
        let token = self.advance();
        match token.kind {
            TokenKind::Number(n) => Ok(Expr::Const(Some(Value::Number(n)))),
            TokenKind::Str(s) => Ok(Expr::Const(Some(Value::String(s)))),
            TokenKind::Keyword(Keyword::True) => Ok(Expr::Const(Some(Value::Bool(true)))),
            TokenKind::Keyword(Keyword::False) => Ok(Expr::Const(Some(Value::Bool(false)))),
            TokenKind::Keyword(Keyword::Null) => Ok(Expr::Const(Some(Value::Null))),
            TokenKind::Keyword(Keyword::Undefined) => Ok(Expr::Const(None)),
            TokenKind::LParen => {
                let inner = self.expr()?;
                self.expect(&TokenKind::RParen, "')'")?;
                Ok(inner)
            }
            TokenKind::LBracket => {
                self.enter()?;
                let items = self.expr_list(&TokenKind::RBracket);
                self.leave();
                Ok(Expr::Array(items?))
            }
            TokenKind::Ident(name) if self.peek().kind == TokenKind::LParen => {
                self.call(&name, token.pos)
            }
            TokenKind::Ident(name) | TokenKind::BracketIdent(name) => {
                Ok(Expr::Path(self.path(name)?))
            }
            _ => {
                self.pos -= usize::from(token.kind != TokenKind::Eof);
                Err(self.expected("an expression"))
            }
        }
    }

    /// The rest of a path whose first segment was `first`: `{"." name}`. After a dot any word
    /// is a name, keywords included, and so are all-digit keys.
    fn path(&mut self, first: String) -> Result<Path> {
        let mut segments = vec![first];
        while self.eat(&TokenKind::Dot) {
            let token = self.peek();
            let segment = match &token.kind {
                TokenKind::Ident(name) | TokenKind::BracketIdent(name) => name.clone(),
                TokenKind::Keyword(_) => token.text.clone(),
                TokenKind::Number(_) if token.text.bytes().all(|b| b.is_ascii_digit()) => {
                    token.text.clone()
                }
                _ => return Err(self.expected("a property name after '.'")),
            };
            self.advance();
            segments.push(segment);
        }
        Ok(Path(segments))
    }

    // call = function_name "(" [expr {"," expr}] ")"
    fn call(&mut self, name: &str, pos: usize) -> Result<Expr> {
        if Aggregate::is_name(name) {
            return Err(QueryError::new(
                pos,
                format!(
                    "aggregate {}() is only allowed as a SELECT item",
                    name.to_ascii_uppercase()
                ),
            ));
        }
        let Some((function, min, max)) = Function::lookup(name) else {
            return Err(QueryError::new(pos, format!("unknown function '{name}'")));
        };
        self.advance(); // '('
        self.enter()?;
        let args = self.expr_list(&TokenKind::RParen);
        self.leave();
        let args = args?;
        if args.len() < min || args.len() > max {
            return Err(QueryError::new(
                pos,
                Function::arity_error(name, min, max, args.len()),
            ));
        }
        Ok(Expr::Call(function, args))
    }
}

fn arith(first: Expr, rest: Vec<(ArithOp, Expr)>) -> Expr {
    if rest.is_empty() {
        first
    } else {
        Expr::Arith(Box::new(first), rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(s: &str) -> Expr {
        Expr::Path(Path::dotted(s))
    }

    fn lit(v: Value) -> Expr {
        Expr::Const(Some(v))
    }

    fn cmp(op: CmpOp, a: Expr, b: Expr) -> Expr {
        Expr::Compare(op, Box::new(a), Box::new(b))
    }

    fn filter(text: &str) -> Expr {
        parse(&format!("SELECT * FROM devices WHERE {text}"))
            .unwrap()
            .filter
            .unwrap()
    }

    fn items(text: &str) -> Vec<SelectItem> {
        match parse(text).unwrap().select {
            Select::Items(items) => items,
            Select::All => panic!("expected items"),
        }
    }

    fn err(text: &str) -> QueryError {
        parse(text).unwrap_err()
    }

    #[test]
    fn select_star_from_devices() {
        assert_eq!(
            parse("SELECT * FROM devices").unwrap(),
            Query {
                top: None,
                select: Select::All,
                source: Source::Devices,
                filter: None,
                group_by: vec![],
            }
        );
        let q = parse("select top 5 * from Devices.Modules").unwrap();
        assert_eq!((q.top, q.source), (Some(5), Source::Modules));
    }

    #[test]
    fn projections_with_and_without_alias() {
        assert_eq!(
            items("SELECT deviceId, properties.reported.temperature AS t FROM devices"),
            vec![
                SelectItem {
                    kind: ItemKind::Expr(path("deviceId")),
                    name: None
                },
                SelectItem {
                    kind: ItemKind::Expr(path("properties.reported.temperature")),
                    name: Some("t".into())
                },
            ]
        );
    }

    #[test]
    fn aggregates_get_positional_names_unless_aliased() {
        assert_eq!(
            items("SELECT COUNT(), MAX(version) AS v, SUM(version) FROM devices"),
            vec![
                SelectItem {
                    kind: ItemKind::Aggregate(Aggregate::Count),
                    name: Some("$1".into())
                },
                SelectItem {
                    kind: ItemKind::Aggregate(Aggregate::Max(path("version"))),
                    name: Some("v".into())
                },
                SelectItem {
                    kind: ItemKind::Aggregate(Aggregate::Sum(path("version"))),
                    name: Some("$2".into())
                },
            ]
        );
        // A property called `count` is still a property.
        assert_eq!(
            items("SELECT count FROM devices")[0].kind,
            ItemKind::Expr(path("count"))
        );
    }

    #[test]
    fn group_by_paths() {
        let q = parse(
            "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS n \
             FROM devices GROUP BY properties.reported.telemetryConfig.status",
        )
        .unwrap();
        assert_eq!(
            q.group_by,
            vec![Path::dotted("properties.reported.telemetryConfig.status")]
        );
        let q = parse(
            "SELECT status, connectionState, COUNT() FROM devices GROUP BY status, connectionState",
        )
        .unwrap();
        assert_eq!(q.group_by.len(), 2);
    }

    #[test]
    fn precedence_or_and_not() {
        assert_eq!(
            filter("a = 1 OR b = 2 AND NOT c = 3 OR d"),
            Expr::Or(vec![
                cmp(CmpOp::Eq, path("a"), lit(json!(1))),
                Expr::And(vec![
                    cmp(CmpOp::Eq, path("b"), lit(json!(2))),
                    Expr::Not(Box::new(cmp(CmpOp::Eq, path("c"), lit(json!(3))))),
                ]),
                path("d"),
            ])
        );
        assert_eq!(
            filter("(a OR b) AND c"),
            Expr::And(vec![Expr::Or(vec![path("a"), path("b")]), path("c")])
        );
    }

    #[test]
    fn long_or_chains_stay_flat() {
        let chain: Vec<String> = (0..500).map(|i| format!("a = {i}")).collect();
        match filter(&chain.join(" OR ")) {
            Expr::Or(terms) => assert_eq!(terms.len(), 500),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn arithmetic_precedence() {
        assert_eq!(
            filter("a + b * 2 - 1 > 0"),
            cmp(
                CmpOp::Gt,
                Expr::Arith(
                    Box::new(path("a")),
                    vec![
                        (
                            ArithOp::Add,
                            Expr::Arith(Box::new(path("b")), vec![(ArithOp::Mul, lit(json!(2)))])
                        ),
                        (ArithOp::Sub, lit(json!(1))),
                    ]
                ),
                lit(json!(0))
            )
        );
        assert_eq!(filter("-x").clone(), Expr::Neg(Box::new(path("x"))));
        assert_eq!(filter("+x"), path("x"));
    }

    #[test]
    fn every_comparison_operator() {
        for (text, op) in [
            ("=", CmpOp::Eq),
            ("!=", CmpOp::Ne),
            ("<>", CmpOp::Ne),
            ("<", CmpOp::Lt),
            (">", CmpOp::Gt),
            ("<=", CmpOp::Le),
            (">=", CmpOp::Ge),
        ] {
            assert_eq!(
                filter(&format!("a {text} 'x'")),
                cmp(op, path("a"), lit(json!("x")))
            );
        }
    }

    #[test]
    fn in_nin_and_not_in_with_brackets_or_parentheses() {
        let list = vec![
            lit(json!("wired")),
            lit(json!(-1)),
            lit(json!(-2.5)),
            lit(Value::Null),
        ];
        let expected = |negated| Expr::In {
            expr: Box::new(path("x")),
            list: list.clone(),
            negated,
        };
        assert_eq!(filter("x IN ['wired', -1, -2.5, null]"), expected(false));
        assert_eq!(filter("x in ('wired', -1, -2.5, null)"), expected(false));
        assert_eq!(filter("x NIN ['wired', -1, -2.5, null]"), expected(true));
        assert_eq!(filter("x NOT IN ['wired', -1, -2.5, null]"), expected(true));
        assert_eq!(
            filter("x IN []"),
            Expr::In {
                expr: Box::new(path("x")),
                list: vec![],
                negated: false
            }
        );
    }

    #[test]
    fn literals() {
        assert_eq!(filter("true"), lit(json!(true)));
        assert_eq!(filter("FALSE"), lit(json!(false)));
        assert_eq!(filter("Null"), lit(Value::Null));
        assert_eq!(filter("undefined"), Expr::Const(None));
        assert_eq!(filter("0x10"), lit(json!(16)));
        assert_eq!(filter("\"dq\""), lit(json!("dq")));
        assert_eq!(
            filter("[1, 'a', [2]]"),
            Expr::Array(vec![
                lit(json!(1)),
                lit(json!("a")),
                Expr::Array(vec![lit(json!(2))])
            ])
        );
    }

    #[test]
    fn paths_with_dollar_brackets_keywords_and_digits() {
        assert_eq!(
            filter("properties.reported.$version"),
            path("properties.reported.$version")
        );
        assert_eq!(
            filter("tags.[[group]].name"),
            Expr::Path(Path(vec!["tags".into(), "group".into(), "name".into()]))
        );
        assert_eq!(filter("tags.group.by"), path("tags.group.by"));
        assert_eq!(filter("tags.list.0"), path("tags.list.0"));
        assert_eq!(filter("[[select]]"), path("select"));
    }

    #[test]
    fn function_calls() {
        assert_eq!(
            filter("is_defined(properties.reported.connectivity)"),
            Expr::Call(
                Function::IsDefined,
                vec![path("properties.reported.connectivity")]
            )
        );
        assert_eq!(
            filter("STARTSWITH(deviceId, 'd')"),
            Expr::Call(
                Function::StartsWith,
                vec![path("deviceId"), lit(json!("d"))]
            )
        );
        assert_eq!(
            filter("concat('a', 'b', 'c') = 'abc'"),
            cmp(
                CmpOp::Eq,
                Expr::Call(
                    Function::Concat,
                    vec![lit(json!("a")), lit(json!("b")), lit(json!("c"))]
                ),
                lit(json!("abc"))
            )
        );
    }

    #[test]
    fn syntax_errors_name_position_expected_and_found() {
        let e = err("SELECT deviceId WHERE x = 1");
        assert_eq!(e.position, 16);
        assert_eq!(e.message, "expected FROM, found 'WHERE'");
        assert_eq!(
            e.to_string(),
            "Syntax error at position 16: expected FROM, found 'WHERE'"
        );
        let e = err("");
        assert_eq!(
            (e.position, e.message.as_str()),
            (0, "expected SELECT, found end of query")
        );
        let e = err("SELECT * FROM devices WHERE");
        assert_eq!(e.position, 27);
        assert_eq!(e.message, "expected an expression, found end of query");
        let e = err("SELECT * FROM devices WHERE (a = 1");
        assert_eq!(
            (e.position, e.message.as_str()),
            (34, "expected ')', found end of query")
        );
        let e = err("SELECT * FROM devices WHERE a = = 1");
        assert_eq!(
            (e.position, e.message.as_str()),
            (32, "expected an expression, found '='")
        );
        let e = err("SELECT * FROM devices WHERE a = 1 b");
        assert_eq!(e.position, 34);
        assert!(
            e.message.starts_with("expected an operator, GROUP BY"),
            "{e}"
        );
        assert_eq!(err("SELECT * FROM devices x").position, 22);
        assert_eq!(
            err("SELECT FROM devices").message,
            "expected an expression, found 'FROM'"
        );
        assert_eq!(err("SELECT a, FROM devices").position, 10);
        assert_eq!(
            err("SELECT a AS FROM devices").message,
            "expected an alias name after AS, found 'FROM'"
        );
        assert_eq!(
            err("SELECT a AS").message,
            "expected an alias name after AS, found end of query"
        );
        assert_eq!(err("SELECT TOP x * FROM devices").position, 11);
        assert_eq!(err("SELECT TOP -1 * FROM devices").position, 11);
        assert_eq!(err("SELECT TOP 1.5 * FROM devices").position, 11);
        assert_eq!(
            err("SELECT * FROM devices WHERE x IN 5").message,
            "expected '[' or '(' after IN, found '5'"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE x IN [1 2]").message,
            "expected ',' or ']', found '2'"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE a.").message,
            "expected a property name after '.', found end of query"
        );
        assert_eq!(
            err("SELECT * FROM devices GROUP status").message,
            "expected BY, found 'status'"
        );
        assert_eq!(
            err("SELECT * FROM devices GROUP BY 1").message,
            "expected a property path, found '1'"
        );
        assert_eq!(
            err("SELECT COUNT(1) FROM devices").message,
            "expected ')' (COUNT takes no arguments), found '1'"
        );
        assert_eq!(err("SELECT * FROM devices WHERE x = 'open").position, 32);
    }

    #[test]
    fn unknown_sources_are_rejected() {
        let e = err("SELECT * FROM things");
        assert_eq!(e.position, 14);
        assert_eq!(
            e.message,
            "expected devices or devices.modules, found 'things'"
        );
        let e = err("SELECT * FROM devices.jobs WHERE devices.jobs.deviceId = 'myDeviceId'");
        assert_eq!(e.position, 14);
        assert!(e.message.contains("devices.jobs is not supported"), "{e}");
        assert_eq!(
            err("SELECT * FROM devices.x").message,
            "expected modules after 'devices.', found 'x'"
        );
    }

    #[test]
    fn function_errors() {
        let e = err("SELECT * FROM devices WHERE foo(x)");
        assert_eq!(
            (e.position, e.message.as_str()),
            (28, "unknown function 'foo'")
        );
        let e = err("SELECT * FROM devices WHERE is_defined(a, b)");
        assert_eq!(e.position, 28);
        assert_eq!(
            e.message,
            "function IS_DEFINED takes 1 argument(s), found 2"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE concat('a')").message,
            "function CONCAT takes at least 2 argument(s), found 1"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE substring('a')").message,
            "function SUBSTRING takes 2 to 3 argument(s), found 1"
        );
        let e = err("SELECT * FROM devices WHERE COUNT() > 1");
        assert_eq!(
            (e.position, e.message.as_str()),
            (28, "aggregate COUNT() is only allowed as a SELECT item")
        );
        assert!(err("SELECT COUNT() + 1 FROM devices")
            .message
            .starts_with("expected FROM"));
    }

    #[test]
    fn select_list_must_agree_with_group_by() {
        let e = err("SELECT deviceId, COUNT() AS n FROM devices");
        assert_eq!(e.position, 7);
        assert_eq!(
            e.message,
            "cannot mix aggregates and per-row items without GROUP BY"
        );
        let e = err("SELECT status, COUNT() FROM devices GROUP BY connectionState");
        assert_eq!(
            (e.position, e.message.as_str()),
            (7, "a SELECT item must be a GROUP BY path or an aggregate")
        );
        let e = err("SELECT * FROM devices GROUP BY status");
        assert_eq!(
            (e.position, e.message.as_str()),
            (22, "SELECT * cannot be used with GROUP BY")
        );
        assert!(parse("SELECT Status, COUNT() FROM devices GROUP BY status").is_ok());
        assert!(parse("SELECT status FROM devices GROUP BY status").is_ok());
        let e = err("SELECT deviceId, DeviceId FROM devices");
        assert_eq!(
            (e.position, e.message.as_str()),
            (17, "duplicate name 'DeviceId' in SELECT list")
        );
        assert!(err("SELECT a AS x, b AS x FROM devices")
            .message
            .contains("duplicate"));
    }

    #[test]
    fn nesting_is_limited() {
        let nested = |n: usize| {
            format!(
                "SELECT * FROM devices WHERE {}1 = 1{}",
                "(".repeat(n),
                ")".repeat(n)
            )
        };
        // The WHERE expression itself is one level.
        assert!(parse(&nested(MAX_NESTING - 1)).is_ok());
        let e = err(&nested(MAX_NESTING));
        assert_eq!(e.message, "expression nested more than 64 levels deep");
        assert!(parse(&format!(
            "SELECT * FROM devices WHERE {}true",
            "NOT ".repeat(63)
        ))
        .is_ok());
        assert!(parse(&format!(
            "SELECT * FROM devices WHERE {}true",
            "NOT ".repeat(64)
        ))
        .is_err());
        assert!(parse(&format!(
            "SELECT * FROM devices WHERE {}1 = 1",
            "-".repeat(100)
        ))
        .is_err());
        assert!(parse(&format!(
            "SELECT * FROM devices WHERE x IN {}",
            "[".repeat(100)
        ))
        .is_err());
        assert!(parse(&format!(
            "SELECT * FROM devices WHERE {}x",
            "abs(".repeat(100)
        ))
        .is_err());
    }

    #[test]
    fn length_is_limited_to_8192_characters() {
        let pad = |n: usize| format!("SELECT * FROM devices WHERE deviceId = '{}'", "x".repeat(n));
        let fits = pad(MAX_QUERY_CHARS - pad(0).len());
        assert_eq!(fits.chars().count(), MAX_QUERY_CHARS);
        assert!(parse(&fits).is_ok());
        let e = err(&pad(MAX_QUERY_CHARS));
        assert_eq!(
            (e.position, e.message.as_str()),
            (8192, "query is longer than 8192 characters")
        );
    }
}

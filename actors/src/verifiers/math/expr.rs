//! A small LaTeX expression parser: normalised answer text -> [`Expr`].
//!
//! It covers what final answers contain (the part of latex2sympy that graders such as PRM800K and
//! math-verify rely on): numbers (decimal and scientific), single-letter and Greek variables with
//! subscripts, `+ - * /`, implicit multiplication, `^`, `\frac`, `\sqrt[n]{}`, `\binom`, `!`,
//! `|x|`, trigonometric / log / exp functions, `\pi`, `e`, `\infty`, and mixed numbers
//! (`2\frac{1}{2}`). Work is bounded: at most [`MAX_TOKENS`] tokens and [`MAX_DEPTH`] nesting, so
//! adversarial input fails to parse instead of recursing deeply.

use super::token::{tokenize, Tok};

/// Most tokens an expression may have.
pub(crate) const MAX_TOKENS: usize = 1000;
/// Deepest nesting the recursive-descent parser follows.
pub(crate) const MAX_DEPTH: usize = 64;

/// Functions of one argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Func {
    Sin,
    Cos,
    Tan,
    Cot,
    Sec,
    Csc,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Tanh,
    Exp,
    Abs,
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Num(f64),
    Var(String),
    Pi,
    Euler,
    Infinity,
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    /// `Root(index, radicand)`: `\sqrt[index]{radicand}`.
    Root(Box<Expr>, Box<Expr>),
    /// `Log(base, argument)`.
    Log(Box<Expr>, Box<Expr>),
    Call(Func, Box<Expr>),
    Factorial(Box<Expr>),
    Binom(Box<Expr>, Box<Expr>),
}

/// Parse a normalised answer into an expression; `None` when it is not a single expression.
pub(crate) fn parse(text: &str) -> Option<Expr> {
    let toks = tokenize(text)?;
    let mut parser = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let expr = parser.expr()?;
    (parser.pos == parser.toks.len()).then_some(expr)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Sym(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn expr(&mut self) -> Option<Expr> {
        self.enter()?;
        let mut lhs = self.term()?;
        loop {
            if self.eat('+') {
                lhs = Expr::Add(Box::new(lhs), Box::new(self.term()?));
            } else if self.eat('-') {
                lhs = Expr::Sub(Box::new(lhs), Box::new(self.term()?));
            } else {
                break;
            }
        }
        self.depth -= 1;
        Some(lhs)
    }

    fn term(&mut self) -> Option<Expr> {
        let mut lhs = self.unary()?;
        loop {
            if self.eat('*') {
                lhs = Expr::Mul(Box::new(lhs), Box::new(self.unary()?));
            } else if self.eat('/') {
                lhs = Expr::Div(Box::new(lhs), Box::new(self.unary()?));
            } else if self.starts_atom() {
                lhs = Expr::Mul(Box::new(lhs), Box::new(self.power()?));
            } else {
                break;
            }
        }
        Some(lhs)
    }

    /// Whether the next token starts a factor of an implicit product (`2x`, `x(x+1)`).
    fn starts_atom(&self) -> bool {
        match self.peek() {
            Some(Tok::Num(..)) | Some(Tok::Var(_)) | Some(Tok::Cmd(_)) => true,
            Some(Tok::Sym(c)) => matches!(c, '(' | '{'),
            None => false,
        }
    }

    fn unary(&mut self) -> Option<Expr> {
        self.enter()?;
        let out = if self.eat('-') {
            Expr::Neg(Box::new(self.unary()?))
        } else if self.eat('+') {
            self.unary()?
        } else {
            self.power()?
        };
        self.depth -= 1;
        Some(out)
    }

    fn power(&mut self) -> Option<Expr> {
        self.enter()?;
        let base = self.postfix()?;
        let out = if self.eat('^') {
            let exponent = if self.eat('-') {
                Expr::Neg(Box::new(self.power()?))
            } else {
                self.power()?
            };
            Expr::Pow(Box::new(base), Box::new(exponent))
        } else {
            base
        };
        self.depth -= 1;
        Some(out)
    }

    fn postfix(&mut self) -> Option<Expr> {
        let mut e = self.atom()?;
        while self.eat('!') {
            e = Expr::Factorial(Box::new(e));
        }
        Some(e)
    }

    /// A `{...}` group or a single factor, as LaTeX reads a command argument.
    fn argument(&mut self) -> Option<Expr> {
        if self.eat('{') {
            let e = self.expr()?;
            self.eat('}').then_some(e)
        } else {
            self.postfix()
        }
    }

    fn atom(&mut self) -> Option<Expr> {
        self.enter()?;
        let tok = self.toks.get(self.pos)?.clone();
        self.pos += 1;
        let out = match tok {
            Tok::Num(v, is_int) => {
                // Mixed number `2\frac{1}{2}` = 2 + 1/2.
                if is_int && self.peek() == Some(&Tok::Cmd("frac")) {
                    let save = self.pos;
                    self.pos += 1;
                    match self.frac_args()? {
                        (Expr::Num(a), Expr::Num(b)) if a.fract() == 0.0 && b.fract() == 0.0 => {
                            Expr::Num(v + a / b)
                        }
                        _ => {
                            self.pos = save;
                            Expr::Num(v)
                        }
                    }
                } else {
                    Expr::Num(v)
                }
            }
            Tok::Var(name) => match name.as_str() {
                "e" => Expr::Euler,
                _ => Expr::Var(name),
            },
            Tok::Sym('(') => {
                let e = self.expr()?;
                self.eat(')').then_some(e)?
            }
            Tok::Sym('{') => {
                let e = self.expr()?;
                self.eat('}').then_some(e)?
            }
            Tok::Sym('[') => {
                let e = self.expr()?;
                self.eat(']').then_some(e)?
            }
            Tok::Sym('|') => {
                let e = self.expr()?;
                self.eat('|')
                    .then_some(Expr::Call(Func::Abs, Box::new(e)))?
            }
            Tok::Cmd(cmd) => self.command(cmd)?,
            _ => return None,
        };
        self.depth -= 1;
        Some(out)
    }

    fn frac_args(&mut self) -> Option<(Expr, Expr)> {
        // `\frac12` and `\frac1x`: single-character arguments without braces.
        if let Some(Tok::Num(v, true)) = self.peek().cloned() {
            if (10.0..100.0).contains(&v) {
                self.pos += 1;
                return Some((Expr::Num((v / 10.0).floor()), Expr::Num(v % 10.0)));
            }
        }
        let num = self.argument()?;
        let den = self.argument()?;
        Some((num, den))
    }

    fn command(&mut self, cmd: &'static str) -> Option<Expr> {
        Some(match cmd {
            "frac" => {
                let (num, den) = self.frac_args()?;
                Expr::Div(Box::new(num), Box::new(den))
            }
            "binom" => {
                let (n, k) = (self.argument()?, self.argument()?);
                Expr::Binom(Box::new(n), Box::new(k))
            }
            "sqrt" => {
                let index = if self.eat('[') {
                    let e = self.expr()?;
                    self.eat(']').then_some(e)?
                } else {
                    Expr::Num(2.0)
                };
                // `\sqrt3`; `\sqrt12` is read as the whole number, as models mean it.
                let radicand = self.argument()?;
                Expr::Root(Box::new(index), Box::new(radicand))
            }
            "pi" => Expr::Pi,
            "infty" | "inf" => Expr::Infinity,
            "log" | "ln" => {
                let base = if cmd == "log" && self.eat('_') {
                    self.argument()?
                } else {
                    Expr::Euler
                };
                let arg = self.function_argument()?;
                Expr::Log(Box::new(base), Box::new(arg))
            }
            _ => {
                let func = match cmd {
                    "sin" => Func::Sin,
                    "cos" => Func::Cos,
                    "tan" => Func::Tan,
                    "cot" => Func::Cot,
                    "sec" => Func::Sec,
                    "csc" => Func::Csc,
                    "arcsin" => Func::Asin,
                    "arccos" => Func::Acos,
                    "arctan" => Func::Atan,
                    "sinh" => Func::Sinh,
                    "cosh" => Func::Cosh,
                    "tanh" => Func::Tanh,
                    "exp" => Func::Exp,
                    _ => return None,
                };
                // `\sin^2 x` = (sin x)^2.
                let power = if self.eat('^') {
                    Some(self.argument()?)
                } else {
                    None
                };
                let call = Expr::Call(func, Box::new(self.function_argument()?));
                match power {
                    Some(p) => Expr::Pow(Box::new(call), Box::new(p)),
                    None => call,
                }
            }
        })
    }

    /// A function's argument: `(x)`, `{x}`, or an implicit product of factors (`\sin 2x`).
    fn function_argument(&mut self) -> Option<Expr> {
        // `\sin(x)^2` is `(\sin x)^2`: a bracketed argument ends at its bracket.
        if matches!(self.peek(), Some(Tok::Sym('(')) | Some(Tok::Sym('{'))) {
            return self.atom();
        }
        let mut arg = self.power()?;
        while matches!(self.peek(), Some(Tok::Num(..)) | Some(Tok::Var(_))) {
            arg = Expr::Mul(Box::new(arg), Box::new(self.power()?));
        }
        Some(arg)
    }
}

#!/usr/bin/env bash
# Writes an offline English prose corpus of ~1.15 MB: two Jane Austen novels
# (public domain, Project Gutenberg text) from Debian's r-cran-janeaustenr,
# which it installs (with r-base-core) if missing.
#
#   bash scripts/make_english_corpus.sh [OUT]        # default OUT=/tmp/english.txt
#   python -m engine.baseline --data /tmp/english.txt --order all
#
# Text: the package's line vectors `persuasion` and `prideprejudice` (sorted by
# name), each book's lines joined with "\n" plus a final "\n", books separated by
# one blank line. Pure ASCII (so UTF-8). r-cran-janeaustenr 1.0.0-1 gives
# 1,151,623 bytes (sha256 2f8c59c0dddd05a5...); the script prints both.
set -euo pipefail

out="${1:-/tmp/english.txt}"
books="persuasion prideprejudice"

if ! Rscript --vanilla -e 'library(janeaustenr)' >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y --no-install-recommends r-cran-janeaustenr >/dev/null 2>&1 || {
        $sudo apt-get update -qq
        $sudo apt-get install -y --no-install-recommends r-cran-janeaustenr >/dev/null
    }
fi

tmp="$(mktemp "${out}.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
Rscript --vanilla - "$tmp" $books <<'RSCRIPT'
args <- commandArgs(trailingOnly = TRUE)
path <- args[1]
books <- sort(args[-1], method = "radix")          # C-locale order
e <- new.env()
utils::data(list = books, package = "janeaustenr", envir = e)
txt <- vapply(books, function(b) paste0(paste(get(b, envir = e), collapse = "\n"), "\n"), "")
con <- file(path, "wb")
writeBin(charToRaw(enc2utf8(paste(txt, collapse = "\n"))), con)
close(con)
RSCRIPT
mv "$tmp" "$out"
trap - EXIT

python3 - "$out" <<'PY'
import sys
raw = open(sys.argv[1], "rb").read()
raw.decode("utf-8")                       # strict: fails loudly if not UTF-8
assert b"\x00" not in raw and 1_000_000 <= len(raw) <= 1_200_000, len(raw)
PY
ver="$(dpkg-query -W -f '${Version}' r-cran-janeaustenr 2>/dev/null || echo unknown)"
echo "package: r-cran-janeaustenr $ver; books: $books"
echo "path: $out"
echo "size: $(wc -c < "$out") bytes"
echo "sha256: $(sha256sum "$out" | cut -d' ' -f1)"

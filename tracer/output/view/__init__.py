"""Views of a Snapshot for people.

- `fmt`: numbers, durations and frames as short strings (no rich).
- `status`: the facts every view states (header fields, drops, exit status).
- `live`: the interactive full-screen view (`render`, `LiveView`), on rich.
- `panes`: the live view's tables, each fitted to the rows it is given.
- `text`: plain-text output: `BatchView` for pipes, and the tables the text report
  (`memtrace.output.reports.text`, also the summary at exit) shares with it.
- `keys`: single keystrokes from the terminal (`KeyReader`, `KEY_BINDINGS`).

Import the submodule you need: `text` and `keys` do not import rich.
"""

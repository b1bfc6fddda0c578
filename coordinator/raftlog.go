package coordinator

import (
	"context"
	"io"
	"log"
	"log/slog"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// raftLogger is hashicorp/raft's logger (hclog) writing into the
// coordinator's slog.Logger, so that a coordinator's log is one format:
// raft's lines are records of the same handler, with component=raft and
// raft's key/value pairs as attributes.
type raftLogger struct {
	log   *slog.Logger
	name  string
	level hclog.Level
	args  []any
}

var _ hclog.Logger = (*raftLogger)(nil)

// newRaftLogger routes raft's lines at level and above into log.
func newRaftLogger(log *slog.Logger, level hclog.Level) *raftLogger {
	if level == hclog.NoLevel {
		level = hclog.Warn
	}
	return &raftLogger{log: log.With("component", "raft"), level: level}
}

// slogLevel maps hclog's levels onto slog's (trace below debug).
func slogLevel(l hclog.Level) slog.Level {
	switch l {
	case hclog.Trace:
		return slog.LevelDebug - 4
	case hclog.Debug:
		return slog.LevelDebug
	case hclog.Warn:
		return slog.LevelWarn
	case hclog.Error:
		return slog.LevelError
	}
	return slog.LevelInfo
}

func (l *raftLogger) Log(level hclog.Level, msg string, args ...any) {
	if level == hclog.Off || level < l.level {
		return
	}
	attrs := make([]any, 0, len(l.args)+len(args)+2)
	if l.name != "" {
		attrs = append(attrs, "raft_logger", l.name)
	}
	attrs = append(attrs, l.args...)
	attrs = append(attrs, args...)
	// hclog allows an odd trailing value; slog would call it !BADKEY.
	if len(args)%2 == 1 {
		attrs = append(attrs[:len(attrs)-1], "extra", attrs[len(attrs)-1])
	}
	for i := 0; i+1 < len(attrs); i += 2 {
		if err, ok := attrs[i+1].(error); ok {
			attrs[i+1] = err.Error()
		}
	}
	l.log.Log(context.Background(), slogLevel(level), msg, attrs...)
}

func (l *raftLogger) Trace(msg string, args ...any) { l.Log(hclog.Trace, msg, args...) }
func (l *raftLogger) Debug(msg string, args ...any) { l.Log(hclog.Debug, msg, args...) }
func (l *raftLogger) Info(msg string, args ...any)  { l.Log(hclog.Info, msg, args...) }
func (l *raftLogger) Warn(msg string, args ...any)  { l.Log(hclog.Warn, msg, args...) }
func (l *raftLogger) Error(msg string, args ...any) { l.Log(hclog.Error, msg, args...) }

func (l *raftLogger) IsTrace() bool { return l.level <= hclog.Trace }
func (l *raftLogger) IsDebug() bool { return l.level <= hclog.Debug }
func (l *raftLogger) IsInfo() bool  { return l.level <= hclog.Info }
func (l *raftLogger) IsWarn() bool  { return l.level <= hclog.Warn }
func (l *raftLogger) IsError() bool { return l.level <= hclog.Error }

func (l *raftLogger) ImpliedArgs() []any { return l.args }

func (l *raftLogger) With(args ...any) hclog.Logger {
	c := *l
	c.args = append(append([]any(nil), l.args...), args...)
	return &c
}

func (l *raftLogger) Name() string { return l.name }

func (l *raftLogger) Named(name string) hclog.Logger {
	c := *l
	if c.name != "" {
		name = c.name + "." + name
	}
	c.name = name
	return &c
}

func (l *raftLogger) ResetNamed(name string) hclog.Logger {
	c := *l
	c.name = name
	return &c
}

// SetLevel changes this logger's level (raft never calls it).
func (l *raftLogger) SetLevel(level hclog.Level) { l.level = level }
func (l *raftLogger) GetLevel() hclog.Level      { return l.level }

func (l *raftLogger) StandardLogger(opts *hclog.StandardLoggerOptions) *log.Logger {
	return log.New(l.StandardWriter(opts), "", 0)
}

// StandardWriter takes the lines of a standard library logger (raft's
// transport) and logs each at info, or at the level its "[WARN]"-style
// prefix names when opts infer levels.
func (l *raftLogger) StandardWriter(opts *hclog.StandardLoggerOptions) io.Writer {
	return stdWriter{l: l, infer: opts != nil && opts.InferLevels}
}

type stdWriter struct {
	l     *raftLogger
	infer bool
}

func (w stdWriter) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	level := hclog.Info
	if w.infer {
		for _, lv := range []struct {
			prefix string
			level  hclog.Level
		}{{"[TRACE]", hclog.Trace}, {"[DEBUG]", hclog.Debug}, {"[INFO]", hclog.Info}, {"[WARN]", hclog.Warn}, {"[ERROR]", hclog.Error}, {"[ERR]", hclog.Error}} {
			if rest, ok := strings.CutPrefix(msg, lv.prefix); ok {
				msg, level = strings.TrimSpace(rest), lv.level
				break
			}
		}
	}
	w.l.Log(level, msg)
	return len(p), nil
}

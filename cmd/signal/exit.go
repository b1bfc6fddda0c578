package main

// Exit statuses, so that a script can tell a mistake of its own from a
// refusal, a failure of the network and a network it cannot reach.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/client"
)

// The exit statuses `signal help` and the README document.
const (
	exitOK = 0
	// exitFailure is any other failure (a local file, a model, a testnet
	// that would not start).
	exitFailure = 1
	// exitUsage is a command line the command cannot run: an unknown
	// command or flag, a missing argument, no URL or credential. The
	// command's usage is printed.
	exitUsage = 2
	// exitUnreachable is a coordinator that could not be reached, or a
	// call that ran out of --timeout.
	exitUnreachable = 3
	// exitRefused is an API answer 4xx: the request was refused (bad
	// input, unknown key, too little balance, unknown run, rate limit).
	exitRefused = 4
	// exitServerError is an API answer 5xx: the network could not serve
	// the call (unavailable, internal error).
	exitServerError = 5
)

// exitStatusHelp is the paragraph of `signal help` that lists them.
const exitStatusHelp = `Exit status: 0 success; 1 failure; 2 usage (unknown command or flag, a
missing argument, no URL or credential; the usage is printed); 3 no
coordinator reachable (or --timeout passed); 4 the API refused the request
(a 4xx answer: the message says why); 5 the network failed it (a 5xx
answer: unavailable or internal).`

// usageError is a command line the command cannot run.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErr(err error) error { return &usageError{err} }

func usageErrorf(format string, args ...any) error { return &usageError{fmt.Errorf(format, args...)} }

// ranError marks an error a command's RunE returned: anything else came
// from cobra before the command ran (flags, arguments), a usage error.
type ranError struct{ err error }

func (e *ranError) Error() string { return e.err.Error() }
func (e *ranError) Unwrap() error { return e.err }

// markRuns wraps every command's RunE so that its errors are ranErrors.
func markRuns(cmd *cobra.Command) {
	if run := cmd.RunE; run != nil {
		cmd.RunE = func(c *cobra.Command, args []string) error {
			if err := run(c, args); err != nil {
				return &ranError{err}
			}
			return nil
		}
	}
	for _, sub := range cmd.Commands() {
		markRuns(sub)
	}
}

// exitStatus is the status err ends the process with.
func exitStatus(err error) int {
	var ue *usageError
	var re *ranError
	var apiErr *client.APIError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue), !errors.As(err, &re):
		return exitUsage
	case errors.As(err, &apiErr) && apiErr.Status >= 500:
		return exitServerError
	case errors.As(err, &apiErr):
		return exitRefused
	case unreachable(err):
		return exitUnreachable
	}
	return exitFailure
}

// unreachable reports a coordinator that could not be reached or did not
// answer in time.
func unreachable(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.ErrUnexpectedEOF)
}

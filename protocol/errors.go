package protocol

import (
	"errors"
	"fmt"
)

// UserError is an error written for the API's user: its message is one
// sentence that names what the user sent, the limit it broke and the fix
// ("examples[0].text is empty: give a text to train on"). Err is what it
// wraps: the sentinel the status is chosen by, or an error that holds it;
// wrapping keeps it visible to errors.Is, while the places where errors become API messages (the
// coordinator's error answer, the node's session error) show the user only
// Msg, found with errors.As — never the chain of context around it.
type UserError struct {
	Msg string
	Err error
}

// Error is the sentence alone: the chain around it adds the context a log
// needs, and the sentinel's own text adds nothing a user can act on.
func (e *UserError) Error() string { return e.Msg }

// Unwrap gives the sentinel to errors.Is.
func (e *UserError) Unwrap() error { return e.Err }

// UserErrorf returns a *UserError for sentinel, its sentence formatted.
// Arguments that are errors are formatted as text: the sentence is the
// message, the sentinel the only thing wrapped.
func UserErrorf(sentinel error, format string, args ...any) error {
	return &UserError{Msg: fmt.Sprintf(format, args...), Err: sentinel}
}

// UserMessage is what the user reads for err: the sentence of the first
// UserError in its chain, or, for an error nobody wrote for a user, its
// whole text.
func UserMessage(err error) string {
	var ue *UserError
	if errors.As(err, &ue) {
		return ue.Msg
	}
	return err.Error()
}

package trainer

import "errors"

// errBadInput marks every input error of the training calls. Temporary:
// becomes an alias of engine-core's ErrInvalidInput once that lands, so that
// callers match both with errors.Is(err, ErrInvalidInput).
var errBadInput = errors.New("invalid input")

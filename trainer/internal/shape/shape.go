// Package shape checks that a row-major matrix fits in a slice, for the
// packages that hand slices to C (vmath, packed, team): a shape error is a
// programming error, caught in Go before C reads or writes out of bounds.
package shape

import "fmt"

// Need panics, naming pkg and the matrix, unless a [rows, cols] matrix
// with row stride ld fits in n elements. An empty matrix always fits.
func Need(pkg, name string, n, rows, cols, ld int) {
	if rows < 0 || cols < 0 {
		panic(fmt.Sprintf("%s: %s: %d rows of %d columns", pkg, name, rows, cols))
	}
	if rows == 0 || cols == 0 {
		return
	}
	if ld < cols {
		panic(fmt.Sprintf("%s: %s: leading dimension %d < %d columns", pkg, name, ld, cols))
	}
	if (rows-1)*ld+cols > n {
		panic(fmt.Sprintf("%s: %s: %dx%d (ld %d) needs %d elements, slice has %d", pkg, name, rows, cols, ld, (rows-1)*ld+cols, n))
	}
}

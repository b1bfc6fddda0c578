package shape

import "testing"

func TestNeed(t *testing.T) {
	fits := [][5]int{{6, 2, 3, 3}, {7, 2, 3, 4}, {0, 0, 3, 1}, {0, 2, 0, 0}, {3, 1, 3, 100}}
	for _, c := range fits {
		Need("p", "m", c[0], c[1], c[2], c[3]) // must not panic
	}
	short := [][5]int{{5, 2, 3, 3}, {6, 2, 3, 4}, {6, 2, 3, 2}, {6, -1, 3, 3}, {6, 1, -3, 3}}
	for _, c := range short {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("n %d, [%d, %d] ld %d: no panic", c[0], c[1], c[2], c[3])
				}
			}()
			Need("p", "m", c[0], c[1], c[2], c[3])
		}()
	}
}

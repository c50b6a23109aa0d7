/*
 * Registry of guest tests. A test is picked with test=<name> on the command
 * line. Any .c file can add tests with GUEST_TEST(name, fn); the linker
 * collects them (section .guest_tests.*, see linker.ld), so a new driver file
 * needs no edit anywhere else.
 *
 * A test prints its own result lines. When it returns, the guest powers off
 * (exit code 0 from the VMM); a test that should not end simply never returns.
 */
#ifndef GUEST_TESTS_H
#define GUEST_TESTS_H

#include "types.h"

struct guest_test {
	const char *name;
	void (*run)(void);
};

#define GUEST_TEST(tname, fn)                                                                        \
	static const struct guest_test __guest_test_##fn                                             \
		__attribute__((used, section(".guest_tests." #fn), aligned(8))) = {tname, fn}

const struct guest_test *find_test(const char *name);

#endif

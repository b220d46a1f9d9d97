// Starts the Java server named by the first argument (Kafka, Cassandra) with the remaining
// arguments, and halts the JVM as soon as its standard input reaches end of file: partita keeps
// the write end of that pipe, so the server never outlives the test, demo or benchmark that
// started it, however that process ends (kill -9 included). Compiled by scripts/setup.sh.
public final class ParentWatch {
    public static void main(String[] args) throws Throwable {
        Thread watch = new Thread(() -> {
            try {
                while (System.in.read() != -1) {
                    // the parent never writes; only end of file matters
                }
            } catch (java.io.IOException e) {
                // a broken pipe means the same: the parent is gone
            }
            Runtime.getRuntime().halt(137);
        }, "partita-parent-watch");
        watch.setDaemon(true);
        watch.start();
        String[] rest = java.util.Arrays.copyOfRange(args, 1, args.length);
        try {
            Class.forName(args[0]).getMethod("main", String[].class).invoke(null, (Object) rest);
        } catch (java.lang.reflect.InvocationTargetException e) {
            throw e.getCause();
        }
    }
}

// Runs one PreparedStatement through PgJDBC on commands read from stdin; prints each result on one line.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;

public class StatementDriver {
    public static void main(String[] args) throws Exception {
        Connection connection = DriverManager.getConnection(args[0], args[1], args[2]);
        PreparedStatement statement = connection.prepareStatement(args[3]);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        System.out.println("ready");
        System.out.flush();
        String line;
        while ((line = in.readLine()) != null) {
            try {
                if (line.equals("query")) {
                    ResultSet rows = statement.executeQuery();
                    rows.next();
                    Object value = rows.getObject(1);
                    System.out.println("value " + value.getClass().getSimpleName() + " " + value);
                } else if (line.equals("begin")) {
                    connection.setAutoCommit(false);
                    System.out.println("ok");
                } else if (line.equals("commit")) {
                    connection.commit();
                    connection.setAutoCommit(true);
                    System.out.println("ok");
                }
            } catch (SQLException error) {
                System.out.println("error " + error.getSQLState() + " " + error.getMessage().replace('\n', ' '));
            }
            System.out.flush();
        }
        connection.close();
    }
}
